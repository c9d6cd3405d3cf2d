"""The published UNICOM and MLCD models as plain data: architecture, download address, checksum.

Pure data: nothing here imports torch, so `unicom models` and `unicom --help` stay instant.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from unicom_cli.errors import UnknownModel

GITHUB_RELEASES = "https://github.com/deepglint/unicom/releases/download"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMBEDDING_UNICOM = "UNICOM feature head over all patch tokens (SPEC 1), not normalised"
EMBEDDING_CLS = "pooler_output: the class token after the final LayerNorm, no projection"
HUB_FIELDS = ("family", "repo", "revision", "params", "download_bytes", "resize_size", "squash",
              "interpolation", "embedding", "mean", "std")


@dataclass(frozen=True)
class ModelSpec:
    """One UNICOM network: its architecture and where its weights live."""

    name: str
    input_size: int  # square input resolution in pixels
    patch_size: int  # ViT patch side in pixels
    width: int  # token dimension
    depth: int  # number of transformer blocks
    heads: int  # attention heads per block
    embedding_size: int  # output dimension of the feature head
    filename: str | None = None  # file name in the cache directory
    url: str | None = None  # GitHub release address (mirrorable) of the fp16 state dict
    gdrive_id: str | None = None  # Google Drive file id, for models published only there
    sha256: str | None = None  # None: published without checksum; computed and reported
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    source: str = "registry"  # "registry" or the JSON file the spec came from
    # Other families (models/families/): everything below keeps its default for a UNICOM ViT.
    family: str = "unicom"  # "unicom" (this ViT + feature head), "hf" (transformers) or "timm"
    repo: str | None = None  # hub repo id, a local save_pretrained folder, or a timm model name
    revision: str | None = None  # the hub commit the weights came from (resolved at load)
    params: int | None = None  # parameter count when not the UNICOM formula's
    download_bytes: int | None = None  # approximate size of the published weights file
    resize_size: int | None = None  # shorter side before the centre crop; None: input_size
    squash: bool = False  # resize both sides to input_size, no crop (SigLIP's processor)
    interpolation: str = "bicubic"  # resize filter: bicubic or bilinear
    embedding: str = EMBEDDING_UNICOM  # what the embedding is (recorded in every output .json)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_params(self) -> int:
        """Trainable parameters, computed from the architecture (equals the SPEC table)."""
        if self.params is not None:
            return self.params
        w, p, n = self.width, self.patch_size, self.num_patches
        patch_embed = 3 * p * p * w + w
        block = (
            2 * 2 * w  # norm1, norm2
            + w * 3 * w  # qkv, no bias
            + w * w + w  # proj
            + w * 4 * w + 4 * w  # fc1
            + 4 * w * w + w  # fc2
        )
        head = n * w * w + 2 * w + w * self.embedding_size + 2 * self.embedding_size
        return patch_embed + n * w + self.depth * block + 2 * w + head

    @property
    def fp16_file_size(self) -> int:
        """Approximate size of the published fp16 state dict (or weights file) in bytes."""
        return self.download_bytes or 2 * self.num_params

    def to_json(self) -> dict:
        """The JSON architecture file of this network (what :func:`spec_from_json` reads back)."""
        fields = _JSON_FIELDS + (HUB_FIELDS if self.family != "unicom" else ())
        data = {"name": self.name, **{key: getattr(self, key) for key in fields}}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @property
    def geometry(self) -> dict:
        """The resize of ``data.images.resize_center_crop`` besides the crop size (input_size)."""
        return {"resize": self.resize_size, "squash": self.squash, "interpolation": self.interpolation,
                "floor_crop": self.family == "hf"}  # transformers floors the crop offset, torchvision rounds

    @property
    def hub_name(self) -> str:
        """How to name this model again on the command line: ``hf:REPO@COMMIT`` when pinned."""
        prefix = "timm:" if self.family == "timm" else "hf:"
        return f"{prefix}{self.repo}" + (f"@{self.revision}" if self.revision else "")


def _release(tag: str, filename: str) -> str:
    return f"{GITHUB_RELEASES}/{tag}/{filename}"


_MODELS: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    _MODELS[spec.name] = spec


_register(ModelSpec(
    name="ViT-B/32", input_size=224, patch_size=32, width=768, depth=12, heads=12, embedding_size=512,
    filename="FP16-ViT-B-32.pt", url=_release("b32", "FP16-ViT-B-32.pt"),
    sha256="f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a"))
_register(ModelSpec(
    name="ViT-B/16", input_size=224, patch_size=16, width=768, depth=12, heads=12, embedding_size=768,
    filename="FP16-ViT-B-16.pt", url=_release("b16", "FP16-ViT-B-16.pt"),
    sha256="c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef"))
_register(ModelSpec(
    name="ViT-L/14", input_size=224, patch_size=14, width=1024, depth=24, heads=16, embedding_size=768,
    filename="FP16-ViT-L-14.pt", url=_release("l14", "FP16-ViT-L-14.pt"),
    sha256="ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd"))
_register(ModelSpec(
    name="ViT-L/14@336px", input_size=336, patch_size=14, width=1024, depth=24, heads=16, embedding_size=768,
    filename="FP16-ViT-L-14-336px.pt", url=_release("l14_336px", "FP16-ViT-L-14-336px.pt"),
    sha256="3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea"))
# Published on Google Drive only, without a checksum (computed on download and reported).
_register(ModelSpec(
    name="ViT-B/16@512px-GLDv2", input_size=512, patch_size=16, width=768, depth=12, heads=12,
    embedding_size=768, filename="UNICOM-ViT-B-16-512px-GLDv2.pt",
    gdrive_id="1Vddx3ITUfscXopwcVQGOVESAmcp6M_8t"))
_register(ModelSpec(
    name="ViT-L/14@512px-GLDv2", input_size=512, patch_size=14, width=1024, depth=24, heads=16,
    embedding_size=768, filename="UNICOM-ViT-L-14-512px-GLDv2.pt",
    gdrive_id="1XCIGmEi6LxGclXuNw3wS_XZlkNSlSQW7"))

# MLCD (SPEC 5): transformers vision towers on the Hugging Face hub, loaded by models/families/hf.py.
# Parameters counted on the meta device from the published architectures (SPEC 5; the test
# rebuilds them). Download sizes are estimates, shown until the file is cached (then its size).
_MLCD = "DeepGlint-AI/mlcd-vit-"
for _name, _repo, _size, _patch, _width, _depth, _heads, _params, _bytes in (
        ("MLCD-ViT-B/32", "base-patch32-224", 224, 32, 768, 12, 12, 87_456_000, 351_000_000),
        ("MLCD-ViT-L/14@336px", "large-patch14-336", 336, 14, 1024, 24, 16, 303_507_456, 1_220_000_000),
        ("MLCD-ViT-bigG/14", "bigG-patch14-224", 224, 14, 1664, 48, 16, 1_842_349_748, 3_690_000_000),
        ("MLCD-ViT-bigG/14@336px", "bigG-patch14-336", 336, 14, 1664, 48, 16, 1_842_349_748, 3_690_000_000),
        ("MLCD-ViT-bigG/14@448px", "bigG-patch14-448", 448, 14, 1664, 48, 16, 1_842_349_748, 3_690_000_000)):
    _register(ModelSpec(
        name=_name, input_size=_size, patch_size=_patch, width=_width, depth=_depth, heads=_heads,
        embedding_size=_width, family="hf", repo=_MLCD + _repo, params=_params, download_bytes=_bytes,
        embedding=EMBEDDING_CLS))

_JSON_FIELDS = ("input_size", "patch_size", "width", "depth", "heads", "embedding_size")
# Far above every published ViT (ViT-22B: width 6144, depth 48): sizes beyond are typos that
# would otherwise ask for terabytes before failing.
_JSON_LIMITS = {"input_size": 8192, "patch_size": 1024, "width": 16384, "depth": 256,
                "heads": 256, "embedding_size": 65536}
_JSON_MAX_PARAMS = 25_000_000_000


def available_models(family: str | None = None) -> list[str]:
    """Names of the registered models (of one family: "unicom" or "hf"), in publication order."""
    return [name for name, spec in _MODELS.items() if family in (None, spec.family)]


def spec_from_json(path: Path) -> ModelSpec:
    """Read a small JSON architecture file (the six integer fields; optional ``name``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UnknownModel(f"{path}: cannot read model JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UnknownModel(f"{path}: model JSON must be an object with {', '.join(_JSON_FIELDS)}, "
                           f"got a {type(data).__name__}")
    missing = [k for k in _JSON_FIELDS if k not in data]
    if missing:
        raise UnknownModel(f"{path}: model JSON lacks {', '.join(missing)}; "
                           f"it needs {', '.join(_JSON_FIELDS)}")
    values = {}
    for key in _JSON_FIELDS:
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UnknownModel(f"{path}: '{key}' must be a positive integer, got {value!r}")
        if value > _JSON_LIMITS[key]:
            raise UnknownModel(f"{path}: '{key}' {value:,} is beyond any ViT (at most "
                               f"{_JSON_LIMITS[key]:,})")
        values[key] = value
    if values["input_size"] < values["patch_size"]:
        raise UnknownModel(f"{path}: input_size {values['input_size']} is smaller than "
                           f"patch_size {values['patch_size']}")
    if values["width"] % values["heads"]:
        raise UnknownModel(f"{path}: width {values['width']} is not divisible by heads {values['heads']}")
    if data.get("family", "unicom") != "unicom":
        return _hub_spec_from_json(path, data, values)
    spec = ModelSpec(name=str(data.get("name", Path(path).stem)), source=str(path), **values)
    if spec.num_params > _JSON_MAX_PARAMS:
        raise UnknownModel(f"{path}: {spec.num_params:,} parameters is beyond any ViT (at most "
                           f"{_JSON_MAX_PARAMS:,}); check the sizes")
    return spec


def _hub_spec_from_json(path: Path, data: dict, values: dict) -> ModelSpec:
    """A recorded hub or timm model (the ``model_spec`` of an output .json or index.json)."""
    extra = {key: data[key] for key in HUB_FIELDS if key in data}
    for key in ("mean", "std"):
        if key in extra:
            extra[key] = tuple(float(v) for v in extra[key])
    if extra.get("family") not in ("hf", "timm") or not isinstance(extra.get("repo"), str):
        raise UnknownModel(f"{path}: family {extra.get('family')!r} needs family hf or timm and a repo")
    return ModelSpec(name=str(data.get("name", Path(path).stem)), source=str(path), **values, **extra)


def get_spec(name_or_path: str | Path) -> ModelSpec:
    """Resolve a registered model name or a JSON architecture file to a ModelSpec."""
    key = str(name_or_path)
    if key in _MODELS:
        return _MODELS[key]
    if key.endswith(".json") or Path(key).is_file():
        return spec_from_json(Path(key))
    lowered = {k.lower(): k for k in _MODELS}
    longer = [k for k in lowered if k.startswith(key.lower())] if len(key) > 4 else []
    close = longer or difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    hint = lowered.get(key.lower()) or (lowered[close[0]] if close else None)
    suggestion = f"did you mean '{hint}'? " if hint else ""
    raise UnknownModel(f"unknown model '{key}': {suggestion}choose one of "
                       f"{', '.join(_MODELS)}, hf:ORG/NAME[@REVISION], timm:NAME, a save_pretrained "
                       f"folder or a JSON architecture file")


def with_input_size(spec: ModelSpec, input_size: int) -> ModelSpec:
    """The same architecture at another input resolution (pos_embed and head are resampled).

    A size that is not a multiple of the patch floors the grid, as the patch convolution does:
    the published GLDv2 ViT-L/14 runs at 512 px on a 36×36 grid.
    """
    if input_size < spec.patch_size:
        raise UnknownModel(f"input size {input_size} is smaller than the patch size "
                           f"{spec.patch_size} of {spec.name}")
    return ModelSpec(**{**asdict(spec), "input_size": input_size,
                        "name": spec.name if input_size == spec.input_size
                        else f"{spec.name}@{input_size}px"})


