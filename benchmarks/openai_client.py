"""The `openai` teacher against the best a client can do, on the same local server.

The server is tests/support/openai_server.py as a stub (a real HTTP server process on 127.0.0.1, answers shaped like
vLLM's with 20 top logprobs, no model): `--slots` requests in service at once, each held `--latency` seconds, or
`--miss-latency` when its image is not yet in the server's prefix cache (an image is cached once a request with it
has been answered, as vLLM caches the blocks a finished prefill computed). A fresh server per arm, so each starts
with an empty cache and its own request log. Work: real JPEGs (the 20 ImageNet photos of the `foolbox` wheel,
512 px, then shifted crops of them saved as JPEG, so every sample is a distinct file) x 50 questions.

Arms, alternating round by round so that load on a shared machine hits them alike:
- `makd`: `makd.labels.label_split` (the `makd label` loop: files read, teacher called per batch, shards written)
  with the `openai` teacher at its defaults (256 requests in flight per server, 512 images per call). The
  store's `shard_size` is chosen so that a shard holds as many slot-latencies of work as the default 512-image
  shard does on a 256-slot vLLM server with 50 questions (`shard_size x questions / slots` = 100), so that
  whatever happens between shards weighs what it would at the defaults;
- `bare`: the best a client can do: one asyncio + httpx client over all the images at once (no batches), the
  same window as makd's (the teacher's default `concurrency`, deeper than the server's slots, so requests queue in
  the server instead of each slot idling for a round trip), each image's data URL encoded once, and each image's first question alone
  before its others (all of them then prefix-cache hits); its connections spread over httpx clients of
  CONNECTIONS_PER_CLIENT as makd's are (one httpx pool of a few dozen connections costs several times the CPU
  per request, makd/clients/openai_chat.py), so that neither is measured against httpx's pool;
- `today`: makd's code when the issue was filed (commit ISSUE_COMMIT, unpacked from this repository's history with
  `git archive`, benchmarks/_history.py; needs a full clone) at its defaults (a PNG per request, 8 requests in
  flight, 16-image batches), on a subset of the images; a line for reference.
Both transports are measured for `makd` and `bare`: `data_url` (the default: base64 in every request) and
`file_url` (the server reads the file itself; vLLM: `--allowed-local-media-path`).

Definitions:
- requests/s: (image, question) requests answered per second of wall time of the arm (for `makd` the whole
  label job); `requests_per_s_vs_bare` = makd's / bare's with the same transport, each the best of its rounds;
- server busy: the time the server's slots spent serving (latency per request, miss latency on a miss) over
  slots x the arm's wall time: how well a client keeps the server fed;
- upload bytes per image vs JPEG: the request bodies sent (all Q requests of each image, summed over the images)
  over the JPEG files' bytes (summed over the same images): how many JPEGs an image costs in upload. With data
  URLs every request must carry the image (a chat completion is stateless), so any client sends ~Q x 1.34 JPEGs
  per image (base64 is 4/3 of the bytes); only a server that reads the files itself gets below one JPEG.
The server's ceiling is every slot always busy with the least work possible (one miss per image): slots /
(((Q - 1) x latency + miss latency) / Q) requests/s.
Last line: `requests_per_s_vs_bare=<x> upload_bytes_per_image_vs_jpeg=<y>`, x the lower of the two transports'
ratios, y for `file_url` (the transport that can meet the goal of y <= 1.2), followed by data_url's y, makd's
prefix-cache hit rate and its requests/s over the ceiling (the lower transport).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _history import package_at, python_at  # noqa: E402
from support.openai_server import ServerProcess, digest  # noqa: E402

from makd.clients.openai_chat import CONNECTIONS_PER_CLIENT, ServerConnection  # noqa: E402
from makd.data.base import file_split  # noqa: E402
from makd.labels import label_split  # noqa: E402
from makd.labels.store import software_versions  # noqa: E402
from makd.questions import QuestionSet  # noqa: E402
from makd.teachers import build_teacher  # noqa: E402

WINDOW = ServerConnection.model_fields["concurrency"].default  # makd's window per server, given to bare too
ISSUE_COMMIT = "afcd89f"  # makd when issue 19 was filed: "concurrency defaults to 8 ... a base64 PNG per request"
QUESTIONS = 50
SHARD_WORK = 100  # shard_size x questions / slots of the defaults: 512 x 50 / 256
TODAY_DRIVER = """
import json, sys, time
from PIL import Image
from makd.questions import QuestionSet
from makd.teachers import build_teacher
url, files, questions = sys.argv[1], json.loads(sys.argv[2]), QuestionSet.model_validate_json(sys.argv[3])
teacher = build_teacher({"name": "openai", "base_url": url, "model": "tiny", "api_key_env": None})
assert "image_format" in teacher.options.model_fields, "not the code of then"
start = time.perf_counter()
for i in range(0, len(files), teacher.batch_size):
    teacher.score([Image.open(f).convert("RGB") for f in files[i:i + teacher.batch_size]], questions)
print(time.perf_counter() - start)
"""


def photos(folder: Path, count: int) -> list[Path]:
    """`count` distinct JPEG files: the foolbox wheel's ImageNet photos, then shifted crops of them."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the foolbox wheel (make setup installs it): its ImageNet photos are the images")
    originals = sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        source, r = originals[k % len(originals)], k // len(originals)
        path = folder / "photos" / f"{source.stem}_{r}.jpg"
        if r == 0:
            path.write_bytes(source.read_bytes())
        else:
            with Image.open(source) as img:
                img.crop((6 * r, 4 * r, img.width - 6 * r, img.height - 4 * r)).save(path, quality=90)
        paths.append(path)
    return paths


def question_set(n: int) -> QuestionSet:
    texts = [f"Does the main object in this picture show visual attribute number {j}?" for j in range(n)]
    return QuestionSet.model_validate({"classes": ["photo"], "questions": [{"id": f"q{j}", "text": t}
                                                                          for j, t in enumerate(texts)]})


def bare_client(url: str, images: list[str], questions: QuestionSet, window: int) -> float:
    """Seconds for every (image, question): one window of `window` requests over all images, each image's URL
    JSON-encoded once and spliced into its requests, its first question alone and then the others."""
    import httpx

    marker = "\x00image\x00"
    templates = []
    for q in questions.texts:
        body = {"model": "tiny", "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": marker}},
                                                          {"type": "text", "text": f"{q} Answer with Yes or No."}]}]}
        head, _, tail = json.dumps(body).partition(json.dumps(marker))
        templates.append((head.encode(), tail.encode()))

    async def run() -> None:
        free = list(range(window))  # request slots; slot s uses clients[s // CONNECTIONS_PER_CLIENT]
        ready = asyncio.Semaphore(window)
        per = CONNECTIONS_PER_CLIENT
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        clients = [httpx.AsyncClient(base_url=url + "/", limits=limits, timeout=600,
                                     headers={"Content-Type": "application/json"}) for _ in range(-(-window // per))]

        async def ask(shared: bytes, j: int) -> None:
            async with ready:
                slot = free.pop()
                try:
                    response = await clients[slot // per].post("chat/completions",
                                                               content=templates[j][0] + shared + templates[j][1])
                finally:
                    free.append(slot)
                response.raise_for_status()
                response.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]

        async def image(image_url: str) -> None:
            shared = json.dumps(image_url).encode()
            await ask(shared, 0)
            await asyncio.gather(*(ask(shared, j) for j in range(1, len(templates))))

        await asyncio.gather(*(image(u) for u in images))
        for client in clients:
            await client.aclose()

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


class Arm:
    """One way of asking: runs against a fresh server; best requests/s, bytes and hits over its rounds."""

    def __init__(self, name: str, transport: str) -> None:
        self.name, self.transport = name, transport
        self.rates: list[float] = []
        self.cpu: list[float] = []
        self.busy: list[float] = []  # the server's slots' time in service over the arm's wall time
        self.sent = self.jpeg = self.hits = self.requests = 0

    def record(self, seconds: float, cpu: float, log: list[dict], jpeg_sizes: dict[str, int],
               service: dict[str, float], slots: int) -> None:
        answered = [r for r in log if r["status"] == 200]
        self.rates.append(len(answered) / seconds)
        self.busy.append(sum(service[r["cache"]] for r in answered) / (slots * seconds))
        self.cpu.append(cpu / max(1, len(answered)))
        self.sent = sum(r["bytes"] for r in log)
        self.jpeg = sum(jpeg_sizes.get(name, 0) for name in {r["image"] for r in log})
        self.hits = sum(r.get("cache") == "hit" for r in answered)
        self.requests = len(answered)

    @property
    def rate(self) -> float:
        return max(self.rates)

    @property
    def upload(self) -> float:
        return self.sent / self.jpeg if self.jpeg else float("nan")

    def line(self, bare: Arm | None) -> str:
        versus = f" ({self.rate / bare.rate:.2f}x bare)" if bare else ""
        return (f"{self.name:5s} {self.transport:8s} {self.rate:7.1f} requests/s{versus}; "
                f"upload {self.sent / max(1, self.requests) / 1e3:6.1f} kB/request = {self.upload:.2f} x the JPEG "
                f"per image; prefix-cache hits {self.hits / max(1, self.requests):.0%}; server busy {max(self.busy):.0%}"
                + (f"; client CPU {1e3 * min(self.cpu):.2f} ms/request" if self.cpu else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="distinct JPEGs (two label shards by default)")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--miss-latency", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--today-images", type=int, default=16)
    parser.add_argument("--no-today", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="makd-openai-bench-"))
    paths = photos(work, args.images)
    questions = question_set(QUESTIONS)
    split = file_split("train", work / "photos", paths, [0] * len(paths), ["photo"], "imagefolder")
    jpeg_sizes = {digest(p.read_bytes()): p.stat().st_size for p in paths}
    shard = max(1, round(SHARD_WORK * args.slots / QUESTIONS))
    service = {"hit": args.latency, "miss": args.miss_latency}
    ceiling = args.slots / ((QUESTIONS - 1) * args.latency + args.miss_latency) * QUESTIONS  # every slot always busy
    server_args = ["--slots", str(args.slots), "--latency", str(args.latency), "--miss-latency", str(args.miss_latency),
                   "--allowed-local-media-path", str(work / "photos")]
    print(f"{len(paths)} JPEGs (mean {sum(jpeg_sizes.values()) / len(paths) / 1e3:.0f} kB) x {QUESTIONS} questions; "
          f"server: {args.slots} slots, {args.latency:g} s per request, {args.miss_latency:g} s on a prefix-cache "
          f"miss (at most {ceiling:.0f} requests/s); makd: teacher defaults, label shards of {shard} images")

    arms = {(name, t): Arm(name, t) for t in ("data_url", "file_url") for name in ("makd", "bare")}
    urls = {"data_url": [f"data:image/jpeg;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in paths],
            "file_url": [p.resolve().as_uri() for p in paths]}
    software_versions()  # its imports (torch) once, as `makd label` has them before its first shard
    counter = 0
    for round_ in range(args.rounds):
        for transport in ("data_url", "file_url"):
            for name in ("makd", "bare") if round_ % 2 == 0 else ("bare", "makd"):
                counter += 1
                with ServerProcess(None, work, *server_args, name=f"server{counter}") as stub:
                    cpu = time.process_time()
                    if name == "bare":
                        seconds = bare_client(stub.base_url, urls[transport], questions, WINDOW)
                    else:
                        teacher = build_teacher({"name": "openai", "base_url": stub.base_url, "model": "tiny",
                                                 "api_key_env": None, "image_transport": transport})
                        start = time.perf_counter()
                        label_split(split, teacher, questions, work / f"labels{counter}", shard_size=shard,
                                    progress=False)
                        seconds = time.perf_counter() - start
                    cpu = time.process_time() - cpu
                    arms[name, transport].record(seconds, cpu, stub.requests(), jpeg_sizes, service, args.slots)

    today = None
    if not args.no_today:
        code = package_at(ISSUE_COMMIT, work / "today", "today")
        subset = [str(p) for p in paths[: args.today_images]]
        with ServerProcess(None, work, *server_args, name="today") as stub:
            done = subprocess.run([*python_at(code, TODAY_DRIVER), stub.base_url, json.dumps(subset),
                                   questions.model_dump_json()], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"arm today: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
            today = Arm("today", "png")
            today.record(float(done.stdout.split()[-1]), 0.0, stub.requests(), jpeg_sizes, service, args.slots)
            today.cpu = []
            today.jpeg = sum(Path(p).stat().st_size for p in subset)

    for transport in ("data_url", "file_url"):
        print(arms["bare", transport].line(None))
        print(arms["makd", transport].line(arms["bare", transport]))
    if today is not None:
        print(f"{today.line(arms['bare', 'data_url'])}   <- today's code ({ISSUE_COMMIT}, {args.today_images} images)")
    x = min(arms["makd", t].rate / arms["bare", t].rate for t in ("data_url", "file_url"))
    hits = arms["makd", "data_url"].hits / max(1, arms["makd", "data_url"].requests)
    ceiling_share = min(arms["makd", t].rate for t in ("data_url", "file_url")) / ceiling
    print(f"requests_per_s_vs_bare={x:.3f} upload_bytes_per_image_vs_jpeg={arms['makd', 'file_url'].upload:.3f} "
          f"upload_transport=file_url data_url_upload_bytes_per_image_vs_jpeg={arms['makd', 'data_url'].upload:.2f} "
          f"prefix_cache_hit_rate={hits:.3f} requests_per_s_vs_server_ceiling={ceiling_share:.3f}")


if __name__ == "__main__":
    main()
