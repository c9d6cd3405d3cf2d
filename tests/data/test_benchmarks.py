"""Benchmark readers on fixtures written in each real on-disk format."""

import numpy as np
import pytest
from PIL import Image

from unicom_cli.data.benchmarks import load_benchmark
from unicom_cli.errors import DatasetLayout, InputError, UsageError


def img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (len(path.name) * 9 % 255, 40, 90)).save(path)


def test_cub_class_split(tmp_path):
    root = tmp_path / "CUB_200_2011" / "images"
    for c in range(1, 201):
        n = 2 if c in (1, 100, 101, 200) else 1
        for i in range(n):
            img(root / f"{c:03d}.Bird_{c}" / f"Bird_{c}_{i}.jpg")
    b = load_benchmark("cub", tmp_path)
    assert len(b.test.paths) == 102 and len(b.train.paths) == 102
    assert b.test.labels.min() == 100 and b.test.labels.max() == 199
    assert b.test.paths[0] == "images/101.Bird_101/Bird_101_0.jpg" and b.test.labels[0] == 100
    assert b.train.labels[-1] == 99 and b.train.paths[-1].startswith("images/100.")
    assert (b.root / b.test.paths[-1]).is_file()
    assert b.test.all_vs_all and b.default_recall == [1, 2, 4, 8]


def test_cub_wrong_class_count(tmp_path):
    img(tmp_path / "CUB_200_2011" / "images" / "001.A" / "a.jpg")
    with pytest.raises(DatasetLayout, match="1 class folders, expected 200"):
        load_benchmark("cub", tmp_path)


def write_cars(tmp_path, classes=(1, 98, 99, 196, 99)):
    from scipy.io import savemat

    root = tmp_path / "cars196"
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
             ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    rows = []
    for i, c in enumerate(classes, start=1):
        rel = f"car_ims/{i:06d}.jpg"
        img(root / rel)
        rows.append((rel, 1, 2, 3, 4, c, i % 2))
    savemat(root / "cars_annos.mat", {"annotations": np.array(rows, dtype=dtype).reshape(1, -1),
                                      "class_names": np.array(["a", "b"], dtype=object)})
    return root


def test_cars_and_cub_classification_splits(tmp_path):
    """eval-linear's splits: the cars test flag and CUB's train_test_split.txt, every class in both."""
    from unicom_cli.data.classification import load_classification

    write_cars(tmp_path, classes=(1, 1, 196, 196, 2))  # test flags 1 0 1 0 1
    train, test = load_classification("cars", tmp_path)
    assert train.paths == ["car_ims/000002.jpg", "car_ims/000004.jpg"]
    assert test.paths == ["car_ims/000001.jpg", "car_ims/000003.jpg", "car_ims/000005.jpg"]
    assert train.names == ["001 a", "196"]  # the mat's names where given, else the class id
    assert test.names == ["001 a", "196", "002 b"]
    assert (train.root / train.paths[0]).is_file()

    cub = tmp_path / "CUB_200_2011"
    for c, name in ((1, "a.jpg"), (1, "b.jpg"), (2, "c.jpg")):
        img(cub / "images" / f"{c:03d}.Bird" / name)
    (cub / "images.txt").write_text("1 001.Bird/a.jpg\n2 002.Bird/c.jpg\n3 001.Bird/b.jpg\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 0\n")
    train, test = load_classification("cub", tmp_path)
    assert train.paths == ["images/001.Bird/a.jpg"] and train.names == ["001.Bird"]
    assert test.paths == ["images/002.Bird/c.jpg", "images/001.Bird/b.jpg"]
    assert test.names == ["002.Bird", "001.Bird"]
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n")
    with pytest.raises(DatasetLayout, match="train_test_split.txt: expected one line.*first missing id: 3"):
        load_classification("cub", tmp_path)
    (cub / "train_test_split.txt").write_text("1 1 0\n")
    with pytest.raises(DatasetLayout, match="line 1: expected"):
        load_classification("cub", tmp_path)
    with pytest.raises(UsageError, match="choose one of cars, cub"):
        load_classification("sop", tmp_path)


def test_cars_mat_and_class_split(tmp_path):
    write_cars(tmp_path)
    b = load_benchmark("cars", tmp_path)
    assert b.test.paths == ["car_ims/000003.jpg", "car_ims/000004.jpg", "car_ims/000005.jpg"]
    assert list(b.test.labels) == [98, 195, 98]  # class 99..196 -> label 98..195, test flag ignored
    assert list(b.train.labels) == [0, 97]


def test_cars_malformed_mat(tmp_path):
    from scipy.io import savemat

    (tmp_path / "cars196").mkdir()
    savemat(tmp_path / "cars196" / "cars_annos.mat", {"other": np.zeros(3)})
    with pytest.raises(DatasetLayout, match="cars_annos.mat: not a Cars196 annotation file"):
        load_benchmark("cars", tmp_path)
    (tmp_path / "cars196" / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(DatasetLayout, match="cars_annos.mat"):
        load_benchmark("cars", tmp_path)


def test_sop(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    test_rows = [(1, 11319, 1, "bicycle_final/111085122871_0.JPG"), (2, 11319, 1, "bicycle_final/111085122871_1.JPG"),
                 (3, 11320, 2, "chair_final/222_0.JPG")]
    for _, _, _, p in test_rows:
        img(root / p)
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n" +
                                        "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in test_rows))
    (root / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1 x/a.JPG\n2 2 1 x/b.JPG\n")
    b = load_benchmark("sop", tmp_path)
    assert b.test.paths[2] == "chair_final/222_0.JPG" and list(b.test.labels) == [11319, 11319, 11320]
    assert list(b.train.labels) == [1, 2]
    assert b.default_recall == [1, 10, 100, 1000]
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x\n")
    with pytest.raises(DatasetLayout, match=r"Ebay_test.txt:2: expected"):
        load_benchmark("sop", tmp_path)


def test_inshop(tmp_path):
    root = tmp_path / "Inshop_Clothes"
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/MEN/Tees/id_00000080/01_1_front.jpg", "id_00000080", "query"),
            ("img/MEN/Tees/id_00000007/01_2_side.jpg", "id_00000007", "query"),
            ("img/MEN/Tees/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
            ("img/MEN/Tees/id_00000007/01_3_back.jpg", "id_00000007", "gallery"),
            ("img/MEN/Tees/id_00000099/01_3_back.jpg", "id_00000099", "gallery")]
    for p, _, _ in rows:
        img(root / "Img" / p)
    (root / "Eval").mkdir()
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a}  {b}  {c}\n" for a, b, c in rows)
    (root / "Eval" / "list_eval_partition.txt").write_text(text)
    b = load_benchmark("inshop", tmp_path)
    t = b.test
    assert list(t.query) == [0, 1] and list(t.gallery) == [2, 3, 4]
    assert t.paths[0] == "Img/img/MEN/Tees/id_00000080/01_1_front.jpg"
    lab = t.labels
    assert lab[0] == lab[2] and lab[1] == lab[3] and lab[0] != lab[1] and lab[4] not in (lab[0], lab[1])
    assert t.sizes() == {"queries": 2, "gallery": 3} and len(b.train.paths) == 1
    (root / "Eval" / "list_eval_partition.txt").write_text(text.replace("6\n", "9\n", 1))
    with pytest.raises(DatasetLayout, match="says 9 images but the file lists 6"):
        load_benchmark("inshop", tmp_path)


def test_inat(tmp_path):
    root = tmp_path / "iNaturalist"
    test = ["train_val2018/Plantae/7477/a.jpg", "train_val2018/Plantae/7477/b.jpg", "train_val2018/Aves/2000/c.jpg"]
    for p in test:
        img(root / p)
    (root / "Inat_dataset_splits").mkdir()
    (root / "Inat_dataset_splits" / "Inaturalist_test_set1.txt").write_text("\n".join(test) + "\n")
    (root / "Inat_dataset_splits" / "Inaturalist_train_set1.txt").write_text("train_val2018/Aves/1/x.jpg\n")
    b = load_benchmark("inat", tmp_path)
    assert b.test.paths == test and list(b.test.labels) == [1, 1, 0]  # sorted names: "2000" < "7477"
    assert len(b.train.paths) == 1


def test_gldv2(tmp_path):
    root = tmp_path / "GLDv2"
    index_ids = ["00a1b2", "11aa22", "22bb33", "33cc44"]
    for i in index_ids:
        img(root / "index" / i[0] / i[1] / i[2] / f"{i}.jpg")
    for q in ("a0q1", "b0q2", "c0q3"):
        img(root / "test" / q[0] / q[1] / q[2] / f"{q}.jpg")
    (root / "index" / "index.csv").write_text("id\n" + "\n".join(index_ids) + "\n")
    (root / "test" / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\na0q1,11aa22 33cc44 11aa22,Public\nb0q2,00a1b2,Private\nc0q3,None,Ignored\n")
    b = load_benchmark("gldv2", tmp_path)
    t = b.test
    assert t.paths[0] == "test/a/0/q/a0q1.jpg" and t.paths[2] == "index/0/0/a/00a1b2.jpg"
    assert list(t.query) == [0, 1] and list(t.gallery) == [2, 3, 4, 5]
    assert [list(r) for r in t.relevant] == [[1, 3, 1], [0]]  # as listed: DELF counts repeats
    assert list(t.usage) == ["public", "private"]
    sub = t.subset(np.array([True, True, True, False, True, True]))  # index image 11aa22 skipped
    assert [list(r) for r in sub.relevant] == [[-2, 2, -2], [0]] and list(sub.gallery) == [2, 3, 4]
    pub = load_benchmark("gldv2", tmp_path, gldv2_splits=("public",))
    assert len(pub.test.query) == 1
    (root / "index" / "index.csv").write_text("name\nx\n")
    with pytest.raises(DatasetLayout, match="index.csv: missing column"):
        load_benchmark("gldv2", tmp_path)


def test_folder_and_query_gallery(tmp_path):
    for c in ("cat", "dog"):
        for i in range(2):
            img(tmp_path / "q" / c / f"{i}.png")
            img(tmp_path / "g" / c / f"g{i}.jpg")
    img(tmp_path / "g" / "emu" / "e.jpg")
    (tmp_path / "q" / "cat" / "notes.txt").write_text("x")
    f = load_benchmark("folder:" + str(tmp_path / "q"))
    assert f.test.paths == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert list(f.test.labels) == [0, 0, 1, 1]
    qg = load_benchmark(None, query=tmp_path / "q", gallery=tmp_path / "g")
    t = qg.test
    assert t.paths[0] == "q/cat/0.png" and t.paths[len(t.query)] == "g/cat/g0.jpg"
    assert list(t.labels[t.query]) == [0, 0, 1, 1] and list(t.labels[t.gallery]) == [0, 0, 1, 1, 2]
    sub = t.subset(np.array([True, False, True, True, True, True, True, True, False]))
    assert list(sub.query) == [0, 1, 2] and list(sub.gallery) == [3, 4, 5, 6]


def test_missing_files_name_the_file_and_the_source(tmp_path):
    for name, file in [("cub", "CUB_200_2011/images"), ("cars", "cars_annos.mat"), ("sop", "Ebay_test.txt"),
                       ("inshop", "list_eval_partition.txt"), ("inat", "Inaturalist_test_set1.txt"),
                       ("gldv2", "retrieval_solution_v2.1.csv")]:
        with pytest.raises(DatasetLayout, match=file) as err:
            load_benchmark(name, tmp_path)
        assert "Get " in str(err.value) and "http" in str(err.value)
    with pytest.raises(UsageError, match="choose one of"):
        load_benchmark("imagenet", tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        load_benchmark("folder:" + str(tmp_path / "nope"))


def test_images_missing_under_root(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    root.mkdir()
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 1 1 a/b.JPG\n")
    with pytest.raises(DatasetLayout, match="b.JPG: image listed in"):
        load_benchmark("sop", tmp_path)
