"""The image index that retrieval-guided generation searches: every image of a shard set, embedded by CLIP.

Build (:func:`build_image_index`, or ``python prepare_data.py source=index ...``) reads each shard once,
embeds its images in batches and writes the shard's part atomically; a rerun skips finished shards, and the
index is assembled from the parts in shard order. Search (:class:`ImageIndex`) is exact by default (inner
products in chunks of rows, top-k merged across chunks) or approximate with faiss' HNSW (``backend="faiss"``,
the optional ``faiss`` extra). A row remembers where its image lies in its tar: the image is read back by one
seek.

On disk, in ``out_dir``:

- ``embeddings.safetensors``: ``embeddings`` [N, D], float32 or float16, L2-normalised;
- ``rows.jsonl``: one row per embedding: ``key``, ``shard`` (absolute path), ``member`` (the image's name in
  the tar), ``offset`` and ``size`` (where its bytes lie in the tar), ``captions_en``, ``captions_ko``;
- ``index.json``: ``format``, ``encoder`` (the :attr:`CLIPEncoder.record` that made it), ``dtype``, ``dim``,
  ``count``, ``skipped`` (records skipped, by reason), ``shards``, ``build_id``; replaced last, so it marks a
  whole index;
- ``parts/<shard>-<hash>/``: each shard's embeddings (float32), rows and ``part.json`` (the shard's size and
  mtime, the encoder's fingerprint, its skip counts): the state a rerun resumes from, deletable once built;
- ``hnsw.faiss`` + ``hnsw.json``: the faiss backend's graph, written the first time it is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from src.data.pipeline import CorruptSample, decode_record, describe_skips, expand_shards
from src.data.schema import IMAGE_EXTENSIONS
from src.data.shards import read_records_with_members
from src.retrieval.encoder import CLIPEncoder

__all__ = ["ImageIndex", "IndexRow", "SearchHit", "build_image_index", "ensure_image_index", "exact_top_k"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
ROWS_FILE = "rows.jsonl"
INDEX_FILE = "index.json"
PARTS_DIR = "parts"
PART_FILE = "part.json"
HNSW_FILE, HNSW_RECORD = "hnsw.faiss", "hnsw.json"
BUILD_COMMAND = "python prepare_data.py source=index clip=CLIP shards='DIR/train-*.tar' out_dir=DIR"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
BACKENDS = ("exact", "faiss")
# Scores held at once by exact search (64 MiB of float32): rows per chunk = SCORE_BUDGET // queries.
SCORE_BUDGET = 2**24
# float16 indexes: up to this many queries go through torch's float16 matrix-vector product (half the bytes of
# float32 to read), re-scored in float32; more are multiplied in float32 against widened rows (see half_top_k)
HALF_MATVEC_QUERIES = 4
# Bound on |float16 product - float32 product| for unit vectors: the query's and the score's rounding to
# float16 (2^-11 and 2^-12 at most) and the kernel's accumulation; measured: at most 2.6e-4 at 512-d.
HALF_SCORE_ERROR = 2e-3
# Exact search of a few queries is split across torch's threads from this many rows per thread on
PARALLEL_MIN_ROWS = 2**16


@dataclass(frozen=True)
class IndexRow:
    """One indexed image: its key, where its bytes lie (shard, member, offset, size) and its captions."""

    key: str
    shard: str
    member: str
    offset: int
    size: int
    captions_en: tuple[str, ...] = ()
    captions_ko: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, line: str) -> IndexRow:
        row = json.loads(line)
        return cls(
            **{**row, "captions_en": tuple(row["captions_en"]), "captions_ko": tuple(row["captions_ko"])}
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class SearchHit:
    """A search result: the index row, its cosine similarity to the query, and the row's key."""

    row: int
    score: float
    key: str


class ImageIndex:
    """Image embeddings [N, D] with their rows and the record of the encoder that made them, searchable."""

    def __init__(
        self,
        embeddings: torch.Tensor,
        rows: Sequence[IndexRow],
        encoder: dict[str, Any],
        backend: str = "exact",
        chunk_rows: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 128,
        ef_search: int = 128,
    ) -> None:
        """``chunk_rows``: rows per chunk of exact search (None: as many as keep ``SCORE_BUDGET`` scores);
        ``hnsw_m``, ``ef_*``: the faiss graph's degree and breadths. At efConstruction 40 (faiss' default)
        recall@10 stopped at 0.91 on 1M clustered vectors whatever efSearch; 128 builds a better graph
        (bench/README.md)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if embeddings.ndim != 2 or embeddings.dtype not in DTYPES.values():
            raise ValueError(
                f"embeddings must be [N, D] float32 or float16, got {embeddings.dtype} {embeddings.shape}"
            )
        if len(rows) != len(embeddings):
            raise ValueError(f"{len(rows)} rows for {len(embeddings)} embeddings")
        self.embeddings = embeddings
        self.rows = list(rows)
        self.encoder = dict(encoder)
        self.backend = backend
        self.chunk_rows = chunk_rows
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.directory: Path | None = None
        self.build_id: str | None = None
        self._faiss_index = None

    @classmethod
    def load(
        cls, directory: str | os.PathLike, backend: str = "exact", setting: str = "index", **options: Any
    ) -> ImageIndex:
        """The index built into ``directory``; ``backend``: "exact" or "faiss" (HNSW, read from the directory
        when built before, else built now and saved there); ``options``: those of :class:`ImageIndex`."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        record_path = directory / INDEX_FILE
        if not record_path.is_file():
            raise FileNotFoundError(
                f"No image index at `{setting}`={directory} (no {INDEX_FILE}): build one with "
                f"`{BUILD_COMMAND}` and set `{setting}` to its out_dir."
            )
        record = json.loads(record_path.read_text(encoding="utf-8"))
        embeddings = load_file(str(directory / EMBEDDINGS_FILE))["embeddings"]
        with open(directory / ROWS_FILE, encoding="utf-8") as lines:
            rows = [IndexRow.from_json(line) for line in lines if line.strip()]
        if not len(rows) == len(embeddings) == record["count"]:
            raise ValueError(
                f"The index at `{setting}`={directory} is inconsistent ({record['count']} recorded, "
                f"{len(embeddings)} embeddings, {len(rows)} rows): it was being rebuilt, or rebuild it with "
                f"`{BUILD_COMMAND}`."
            )
        index = cls(embeddings, rows, record["encoder"], backend, **options)
        index.directory, index.build_id = directory, record.get("build_id")
        if backend == "faiss":
            index._faiss()  # built (or read) now, not at the first query
        return index

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # ---- search --------------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, top_k: int = 1) -> list[list[SearchHit]]:
        """The ``top_k`` rows nearest each query [q, D] (normalised embeddings), best first."""
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {tuple(queries.shape)}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        queries = queries.detach().float().cpu()
        if self.backend == "exact":
            scores, rows = exact_top_k(self.embeddings, queries, top_k, self.chunk_rows)
        else:
            scores, rows = self._faiss_top_k(queries, top_k)
        return [
            [SearchHit(row, score, self.rows[row].key) for row, score in zip(r, s, strict=True) if row >= 0]
            for r, s in zip(rows.tolist(), scores.tolist(), strict=True)
        ]

    def search_texts(
        self, encoder: CLIPEncoder, texts: Sequence[str], top_k: int = 1
    ) -> list[list[SearchHit]]:
        """The ``top_k`` images nearest each text, encoded by ``encoder`` (which must be the index's own)."""
        if encoder.record["fingerprint"] != self.encoder.get("fingerprint"):
            raise ValueError(
                f"The query encoder ({encoder.record['path']}) is not the CLIP that built this index "
                f"({self.encoder.get('path')}): their embeddings are not comparable. Query with the index's "
                f"CLIP, or rebuild the index with this one (`{BUILD_COMMAND}`)."
            )
        return self.search(encoder.encode_texts(texts), top_k)

    def _faiss_top_k(self, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._faiss()
        index.hnsw.efSearch = max(self.ef_search, top_k)
        scores, rows = index.search(queries.numpy(), min(top_k, len(self)))
        return torch.from_numpy(scores), torch.from_numpy(rows)  # rows -1: fewer than top_k reachable

    def _faiss(self):
        """The HNSW graph (inner product) of the embeddings: read when saved for this build, else built."""
        if self._faiss_index is not None:
            return self._faiss_index
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "backend=faiss needs faiss-cpu: pip install -e '.[faiss]' (or pip install faiss-cpu)."
            ) from error
        wanted = {"build_id": self.build_id, "M": self.hnsw_m, "ef_construction": self.ef_construction}
        saved = self.directory / HNSW_FILE if self.directory else None
        record = self.directory / HNSW_RECORD if self.directory else None
        if saved and saved.is_file() and record.is_file() and json.loads(record.read_text()) == wanted:
            self._faiss_index = faiss.read_index(str(saved))
            return self._faiss_index
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        for start in range(0, len(self), 65536):  # float32 copies one slice at a time
            index.add(self.embeddings[start : start + 65536].float().numpy())
        if saved and self.build_id and os.access(self.directory, os.W_OK):
            faiss.write_index(index, str(saved) + ".tmp")
            os.replace(str(saved) + ".tmp", saved)
            record.write_text(json.dumps(wanted) + "\n")
        self._faiss_index = index
        return index

    # ---- pixels --------------------------------------------------------------------------------------------

    def image(self, row: int | IndexRow) -> Image.Image:
        """The row's image (RGB), read from its shard by offset."""
        row = row if isinstance(row, IndexRow) else self.rows[int(row)]
        with open(row.shard, "rb") as shard:
            shard.seek(row.offset)
            data = shard.read(row.size)
        if len(data) != row.size:
            raise ValueError(
                f"{row.shard} is shorter than when it was indexed (reading {row.member}): rebuild the index."
            )
        return Image.open(io.BytesIO(data)).convert("RGB")


def exact_top_k(
    embeddings: torch.Tensor, queries: torch.Tensor, top_k: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and rows [q, min(top_k, N)] of the largest inner products, best first, computed ``chunk_rows``
    rows at a time (no [q, N] matrix) and merged across chunks; float16 rows are summed in float32."""
    queries = queries.float()
    threads = torch.get_num_threads()
    few = len(queries) <= HALF_MATVEC_QUERIES and len(embeddings) >= threads * PARALLEL_MIN_ROWS
    if not few or threads == 1 or embeddings.dtype != torch.float32:
        return _top_k_in_chunks(embeddings, queries, top_k, chunk_rows)
    # MKL's float32 matrix-vector product runs on one thread: a few queries read the rows from every thread at
    # once, one slice each (2 threads: 215 -> 145 ms at 1M x 512; float16's product gains nothing, measured).
    slices = embeddings.chunk(threads)
    with ThreadPoolExecutor(len(slices)) as pool:
        found = list(pool.map(lambda rows: _top_k_in_chunks(rows, queries, top_k, chunk_rows), slices))
    offsets = torch.tensor([0, *[len(rows) for rows in slices[:-1]]]).cumsum(0)
    scores = torch.cat([s for s, _ in found], dim=1)
    rows = torch.cat([r + offset for (_, r), offset in zip(found, offsets.tolist(), strict=True)], dim=1)
    best_scores, order = scores.topk(min(top_k, len(embeddings)), dim=1)
    return best_scores, rows.gather(1, order)


def _top_k_in_chunks(
    embeddings: torch.Tensor, queries: torch.Tensor, top_k: int, chunk_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    count, top_k = len(embeddings), min(top_k, len(embeddings))
    chunk_rows = chunk_rows or max(1024, SCORE_BUDGET // max(1, len(queries)))
    widened = None  # float16 rows are widened into this one float32 buffer (a new one per chunk page-faults)
    if embeddings.dtype == torch.float16 and len(queries) > HALF_MATVEC_QUERIES:
        widened = torch.empty(min(chunk_rows, count), embeddings.shape[1])
    best_scores = torch.empty(len(queries), 0)
    best_rows = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, count, chunk_rows):
        chunk = embeddings[start : start + chunk_rows]
        k = min(top_k, len(chunk))
        if chunk.dtype == torch.float32:
            scores, rows = scores_of(chunk, queries).topk(k, dim=1)
        elif widened is not None:
            scores, rows = scores_of(widened[: len(chunk)].copy_(chunk), queries).topk(k, dim=1)
        else:
            found = [half_top_k(chunk, query, k) for query in queries]
            scores, rows = torch.stack([s for s, _ in found]), torch.stack([r for _, r in found])
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_rows = torch.cat([best_rows, rows + start], dim=1)
        best_scores, order = merged_scores.topk(min(top_k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
    return best_scores, best_rows


def scores_of(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[q, n] inner products, computed as rows @ queries.T: MKL multiplies a tall matrix by a few columns up
    to 3x faster than the transposed product (measured on this CPU), and no slower by many."""
    return (rows @ queries.T).T.contiguous()


def half_top_k(rows: torch.Tensor, query: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of one float32 query against float16 rows, at the speed of a float16 matrix-vector
    product.

    torch's float16 product rounds the query and every score to float16 (errors up to ``HALF_SCORE_ERROR``),
    so it only picks the candidates: every row whose approximate score is within twice that error of the k-th
    best (the true top-k are among them), whose scores are then summed again in float32.
    """
    approximate = torch.mv(rows, query.half()).float()
    error = HALF_SCORE_ERROR * max(1.0, float(query.norm()))  # the bound holds for unit vectors
    # The candidates are few on real data: look among the leaders first, and at every row only when all the
    # leaders are candidates (then a row beyond them may be one too).
    leaders = approximate.topk(min(len(rows), 4 * top_k + 64))
    threshold = leaders.values[top_k - 1] - 2 * error
    if len(leaders.values) == len(rows) or leaders.values[-1] < threshold:
        candidates = leaders.indices[leaders.values >= threshold]
    else:
        candidates = (approximate >= threshold).nonzero().squeeze(1)
    scores, best = (rows[candidates].float() @ query).topk(top_k)
    return scores, candidates[best]


# ---- build -----------------------------------------------------------------------------------------------


def build_image_index(
    shards: str | Sequence[str],
    encoder: CLIPEncoder,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``shards`` (brace/glob patterns) into ``out_dir``, resuming finished shards;
    corrupt records are skipped and counted. Returns the stats (also in ``index.json``)."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"index.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"index.batch_size must be at least 1, got {batch_size}")
    try:
        urls = expand_shards(shards)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"No shards found for shards={shards!r}: point `shards` at webdataset tar files, e.g. "
            "shards='data/coco_webtoon/hayao/train-*.tar'."
        ) from error
    remote = [url for url in urls if "://" in url or url.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"shards={remote[0]} is not a local file: the index reads images back from their shard by offset."
        )
    urls = [str(Path(url).resolve()) for url in urls]
    out_dir = Path(out_dir)
    parts = out_dir / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    refuse_other_encoder(out_dir, encoder.record)
    for unfinished in parts.glob("*.tmp"):  # a run that stopped while writing a part
        shutil.rmtree(unfinished)

    started, encoded = time.perf_counter(), 0
    part_dirs = [parts / part_name(url) for url in urls]
    with tqdm(desc="index", unit="img", disable=not progress) as bar:
        for number, (url, part) in enumerate(zip(urls, part_dirs, strict=True), start=1):
            bar.set_postfix_str(f"shard {number}/{len(urls)}")
            if is_current(part, url, encoder.record["fingerprint"]):
                continue
            embed_shard(url, encoder, part, batch_size, bar)
            encoded += 1
    stats = assemble(part_dirs, out_dir, encoder.record, dtype)
    return {
        **stats,
        "encoded_shards": encoded,
        "resumed_shards": len(urls) - encoded,
        "seconds": round(time.perf_counter() - started, 1),
    }


def ensure_image_index(
    clip: str | os.PathLike, shards: str | Sequence[str], out_dir: str | os.PathLike, device: str = "auto"
) -> Path:
    """``out_dir`` holding a whole index of ``shards`` by the CLIP at ``clip``, built first when absent (a
    benchmark's preparation; an index built before by another encoder is refused, as by a build)."""
    out_dir = Path(out_dir)
    if not (out_dir / INDEX_FILE).is_file():
        log.warning("No image index at %s: embedding %s with %s first", out_dir, shards, clip)
        build_image_index(shards, CLIPEncoder.load(clip, device=device), out_dir)
    return out_dir


def part_name(shard: str) -> str:
    """A shard's part directory: its name, and a hash of its path (shards of two folders share names)."""
    return f"{Path(shard).name.split('.', 1)[0]}-{hashlib.sha1(shard.encode()).hexdigest()[:10]}"


def shard_state(shard: str) -> dict[str, int]:
    stat = os.stat(shard)
    return {"shard_bytes": stat.st_size, "shard_mtime_ns": stat.st_mtime_ns}


def is_current(part: Path, shard: str, fingerprint: str) -> bool:
    """The part is finished, for this shard as it is now, by this encoder."""
    record_path = part / PART_FILE
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text(encoding="utf-8"))
    state = shard_state(shard)
    return (
        record["shard"] == shard
        and record["fingerprint"] == fingerprint
        and all(record[name] == value for name, value in state.items())
    )


def refuse_other_encoder(out_dir: Path, encoder: dict[str, Any]) -> None:
    """One out_dir holds the embeddings of one encoder: stop when its index or parts come from another."""
    records = [out_dir / INDEX_FILE, *sorted((out_dir / PARTS_DIR).glob(f"*/{PART_FILE}"))]
    for path in records:
        if not path.is_file():
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        theirs = record.get("encoder") or {
            "fingerprint": record.get("fingerprint"),
            "path": record.get("clip"),
        }
        if theirs["fingerprint"] != encoder["fingerprint"]:
            raise ValueError(
                f"out_dir={out_dir} holds embeddings of another CLIP ({theirs['path']}), not of "
                f"{encoder['path']}: one index holds one encoder's embeddings. Choose another out_dir, or "
                "delete that one to rebuild it."
            )


def embed_shard(shard: str, encoder: CLIPEncoder, part: Path, batch_size: int, bar) -> None:
    """Embed every readable image of one shard; write its part atomically (a directory renamed into place)."""
    from safetensors.torch import save_file

    state = shard_state(shard)  # as it was read: a shard rewritten meanwhile is embedded again next time
    skipped: Counter[str] = Counter()
    rows: list[IndexRow] = []
    embeds: list[torch.Tensor] = []
    batch: list[tuple[IndexRow, Image.Image]] = []

    def flush() -> None:
        embeds.append(encoder.encode_images([image for _, image in batch]))
        rows.extend(row for row, _ in batch)
        bar.update(len(batch))
        batch.clear()

    for row, image in readable_images(shard, skipped):
        batch.append((row, image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()

    staging = part.with_name(part.name + ".tmp")
    staging.mkdir(parents=True)
    embeddings = torch.cat(embeds) if embeds else torch.empty(0, encoder.dim)
    save_file({"embeddings": embeddings.contiguous()}, str(staging / EMBEDDINGS_FILE))
    (staging / ROWS_FILE).write_text("".join(row.to_json() + "\n" for row in rows), encoding="utf-8")
    record = {
        "shard": shard,
        **state,
        "fingerprint": encoder.record["fingerprint"],
        "clip": encoder.record["path"],
        "count": len(rows),
        "skipped": dict(skipped),
    }
    (staging / PART_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if part.exists():  # made from an older version of the shard
        shutil.rmtree(part)
    os.replace(staging, part)


def readable_images(shard: str, skipped: Counter[str]) -> Iterator[tuple[IndexRow, Image.Image]]:
    """Each record's row and decoded image; corrupt records (and an unreadable rest of the tar) are counted in
    ``skipped`` by reason, as the training pipeline counts them."""
    records = read_records_with_members(shard)
    while True:
        try:
            record, members = next(records)
        except StopIteration:
            return
        except (tarfile.TarError, ValueError, OSError) as error:  # truncated, compressed or damaged tar
            log.warning("%s: the rest of the shard is unreadable (%s)", shard, error)
            skipped["unreadable_tar"] += 1
            return
        try:
            sample = decode_record(record)
        except CorruptSample as error:
            skipped[error.reason] += 1
            continue
        member = members[next(ext for ext in IMAGE_EXTENSIONS if ext in record)]  # the one decode_record read
        yield (
            IndexRow(
                key=sample.key,
                shard=shard,
                member=member.name,
                offset=member.offset,
                size=member.size,
                captions_en=tuple(sample.captions_en),
                captions_ko=tuple(sample.captions_ko),
            ),
            sample.image,
        )


def assemble(part_dirs: Sequence[Path], out_dir: Path, encoder: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The index from the parts, in shard order; ``index.json`` is replaced last: it marks a whole index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    records = [json.loads((part / PART_FILE).read_text(encoding="utf-8")) for part in part_dirs]
    skipped = sum((Counter(record["skipped"]) for record in records), Counter())
    count = sum(record["count"] for record in records)
    if count == 0:
        raise ValueError(
            f"No image of the {len(part_dirs)} shard(s) could be indexed (skipped: "
            f"{describe_skips(skipped)}): point `shards` at shards with readable images."
        )
    embeddings, rows_written = None, 0
    rows_tmp = out_dir / (ROWS_FILE + ".tmp")
    with open(rows_tmp, "w", encoding="utf-8") as rows_out:
        for part in part_dirs:
            with safe_open(str(part / EMBEDDINGS_FILE), framework="pt") as stored:
                chunk = stored.get_tensor("embeddings")
            if embeddings is None:
                embeddings = torch.empty(count, chunk.shape[1], dtype=DTYPES[dtype])
            embeddings[rows_written : rows_written + len(chunk)] = chunk.to(DTYPES[dtype])
            rows_written += len(chunk)
            rows_out.write((part / ROWS_FILE).read_text(encoding="utf-8"))
    save_file({"embeddings": embeddings}, str(out_dir / (EMBEDDINGS_FILE + ".tmp")))
    os.replace(out_dir / (EMBEDDINGS_FILE + ".tmp"), out_dir / EMBEDDINGS_FILE)
    os.replace(rows_tmp, out_dir / ROWS_FILE)
    stats = {
        "images": count,
        "dim": int(embeddings.shape[1]),
        "dtype": dtype,
        "shards": len(part_dirs),
        "skipped": dict(skipped),
    }
    index_record = {
        "format": FORMAT_VERSION,
        "encoder": encoder,
        "count": count,
        **{key: stats[key] for key in ("dim", "dtype", "skipped")},
        "shards": [record["shard"] for record in records],
        "build_id": uuid.uuid4().hex,
    }
    (out_dir / (INDEX_FILE + ".tmp")).write_text(json.dumps(index_record, indent=2) + "\n", encoding="utf-8")
    os.replace(out_dir / (INDEX_FILE + ".tmp"), out_dir / INDEX_FILE)
    return stats
