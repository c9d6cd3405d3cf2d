"""`unicom serve` under 200 concurrent requests of which 10 % are hostile, against 200 good ones.

    python benchmarks/serve_hostile.py                  # tiny model, 200 at once, 10 % bad, 5 rounds each
    python benchmarks/serve_hostile.py --concurrent 400 --bad 0.25 --rounds 3

One real server (``--queue-size 256``, so that 200 waiting queries fit its queue) is hit by bursts
of ``--concurrent`` requests sent at once, in interleaved rounds: a clean burst (every request an
image query) and a hostile burst (the same, with ``--bad`` of them replaced by bad requests:
vectors of 1e39, a 400-digit integer, 100k-deep nesting, text as an image, a truncated JPEG, a
wrong content type, a k out of range). Checked per burst: every good request answers 200 with
its k results, every bad one a 4xx (never a 5xx). Reported: good requests/s in each kind of
burst and their ratio (hostile / clean, same run), and the server's RSS after the warm-up and
after every burst (it must stay bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from serve_load import _warm, build_index, make_images, model_args, rss_mb, start_server

BAD_KINDS = {
    "1e39": ("application/json", b'{"vector": [' + b",".join([b"1e39"] * 16) + b"]}"),
    "400 digits": ("application/json", b'{"vector": [' + b"9" * 400 + b"," + b",".join([b"0.1"] * 15) + b"]}"),
    "deep nesting": ("application/json", b'{"vector": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "text as image": ("image/jpeg", b"these are not pixels\n" * 50),
    "wrong type": ("text/plain", b"hello"),
}


async def burst(url: str, queries: list[bytes], n: int, bad_share: float, k: int) -> dict:
    """``n`` requests at once; every ``1 / bad_share``-th one is bad. Returns the counts."""
    import httpx

    every = round(1 / bad_share) if bad_share > 0 else 0
    bad_kinds = list(BAD_KINDS.items())
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def one(i: int) -> tuple[bool, int, bool]:
            if every and i % every == every - 1:
                j = i // every
                if j % (len(bad_kinds) + 2) == len(bad_kinds):  # a truncated JPEG
                    r = await http.post(f"/search?k={k}", files={"image": ("q.jpg", queries[0][:2000])})
                elif j % (len(bad_kinds) + 2) == len(bad_kinds) + 1:  # k out of range
                    r = await http.post("/search?k=100000", files={"image": ("q.jpg", queries[0])})
                else:
                    kind, body = bad_kinds[j % (len(bad_kinds) + 2)][1]
                    r = await http.post(f"/search?k={k}", content=body, headers={"Content-Type": kind})
                return False, r.status_code, 400 <= r.status_code < 500
            r = await http.post(f"/search?k={k}", files={"image": ("q.jpg", queries[i % len(queries)])})
            return True, r.status_code, r.status_code == 200 and len(r.json()["results"]) == k

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.perf_counter() - start
    good = [a for a in answers if a[0]]
    bad = [a for a in answers if not a[0]]
    return {"good": len(good), "good_ok": sum(a[2] for a in good), "bad": len(bad),
            "bad_4xx": sum(a[2] for a in bad), "statuses": sorted({a[1] for a in answers}),
            "seconds": seconds, "good_rps": len(good) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--bad", type=float, default=0.10, help="share of bad requests in a hostile burst")
    parser.add_argument("--rounds", type=int, default=5, help="bursts of each kind, interleaved")
    parser.add_argument("--images", type=int, default=200, help="indexed images")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve_hostile_"))
    queries = make_images(work / "images", args.images)
    models = model_args("tiny", work)
    index = work / "tiny.index"
    build_index(work / "images", index, models, args.device)
    proc, url = start_server(index, models[-1], args.device, 32)
    rows = {"clean": [], "hostile": []}
    failures = 0
    try:
        asyncio.run(_warm(url, queries, args.k, args.concurrent))
        rss_start = rss_mb(proc.pid)
        rss_peak = rss_start
        print(f"server RSS after warm-up: {rss_start:.0f} MB")
        for _ in range(args.rounds):
            for name, share in (("clean", 0.0), ("hostile", args.bad)):
                r = asyncio.run(burst(url, queries, args.concurrent, share, args.k))
                rss = rss_mb(proc.pid)
                rss_peak = max(rss_peak, rss)
                rows[name].append(r)
                failures += (r["good"] - r["good_ok"]) + (r["bad"] - r["bad_4xx"])
                print(f"{name:>7}: {r['good']} good -> {r['good_ok']} answered 200 with k results, "
                      f"{r['bad']} bad -> {r['bad_4xx']} answered 4xx; statuses {r['statuses']}; "
                      f"{r['seconds']:.2f} s, {r['good_rps']:.0f} good req/s; RSS {rss:.0f} MB", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    clean = sum(r["good_rps"] for r in rows["clean"]) / len(rows["clean"])
    hostile = sum(r["good_rps"] for r in rows["hostile"]) / len(rows["hostile"])
    print(f"\ngood requests/s, hostile burst / clean burst (same run): {hostile / clean:.2f}x "
          f"({hostile:.0f} vs {clean:.0f})")
    print(f"RSS: {rss_start:.0f} MB after warm-up, {rss_peak:.0f} MB at most "
          f"(+{rss_peak - rss_start:.0f} MB over {2 * args.rounds} bursts of {args.concurrent})")
    print(f"wrong answers: {failures}; server exit code after SIGTERM: {code}")
    sys.exit(1 if failures or code else 0)


if __name__ == "__main__":
    main()
