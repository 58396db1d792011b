"""`shard_genome.py --verify DIR`: reread a shard directory and check it against its manifest.

Checks every shard's size and sha256 (tar and index), that the tar parses and its members sit exactly
where the index says, that ids run 0..n-1 per split across shards, that every sample decodes to
`window` valid token ids with the recorded N fraction, and that the per-split totals add up. All
problems are collected so one run lists everything that is wrong.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caduceus_dist.fsio import file_mismatch, sha256_file
from caduceus_dist.model.tokenizer import A_ID, N_ID
from caduceus_dist.prep.sharding import max_n_bases
from caduceus_dist.shard_format import (
    MEMBER_SUFFIXES,
    ShardFormatError,
    ShardReader,
    load_manifest,
    read_index,
    sample_key,
    softmasked,
    token_ids,
)

MAX_LISTED = 20


@dataclass
class VerifyReport:
    root: Path
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_tar_layout(tar_path: Path, index: np.ndarray, split: str, first_id: int, version: int) -> str | None:
    with tarfile.open(tar_path, "r:") as tar:
        members = tar.getmembers()
    expected = []
    for k in range(len(index)):
        key = sample_key(split, first_id + k)
        expected += [(key + suffix, *index[k, 2 * m:2 * m + 2]) for m, suffix in enumerate(MEMBER_SUFFIXES[version])]
    found = [(m.name, m.offset_data, m.size) for m in members]
    if len(found) != len(expected):
        return f"{tar_path}: {len(found)} tar members, the index describes {len(expected)}"
    for got, want in zip(found, expected, strict=True):
        if (got[0], int(got[1]), int(got[2])) != (want[0], int(want[1]), int(want[2])):
            return f"{tar_path}: member {got} does not match the index entry {want}"
    return None


def _check_samples(reader: ShardReader, split: str, first_id: int, window: int, max_n: int,
                   flags_allowed: bool) -> tuple[list[str], int, int]:
    """Problems found in the samples, their total N count and their soft-masked base count."""
    problems, n_total, soft_total = [], 0, 0
    for k in range(len(reader)):
        sample = reader.read(k)
        meta, tokens = sample.meta, sample.tokens
        where = f"{reader.tar_path} sample {k}"
        if meta.get("id") != first_id + k or meta.get("split") != split:
            problems.append(f"{where}: id/split {meta.get('id')}/{meta.get('split')}, expected {first_id + k}/{split}")
        if len(tokens) != window or meta.get("length") != window or meta.get("end", 0) - meta.get("start", 0) != window:
            problems.append(f"{where}: {len(tokens)} tokens, metadata length {meta.get('length')}, window {window}")
            continue
        flagged = softmasked(tokens)
        if flagged.any() and not flags_allowed:
            problems.append(f"{where}: soft-mask flags in a format version 1 shard")
        soft_total += int(np.count_nonzero(flagged))
        tokens = token_ids(tokens)
        if tokens.min() < A_ID or tokens.max() > N_ID:
            problems.append(f"{where}: token ids outside A..N ({A_ID}..{N_ID})")
        n_count = int(np.count_nonzero(tokens == N_ID))
        n_total += n_count
        if n_count / window != meta.get("n_fraction"):
            problems.append(f"{where}: N fraction {n_count / window} but metadata says {meta.get('n_fraction')}")
        if n_count > max_n:
            problems.append(f"{where}: {n_count} N bases, more than the {max_n} a stored window may hold")
    return problems, n_total, soft_total


def verify_dataset(root: str | Path) -> VerifyReport:
    root = Path(root)
    report = VerifyReport(root)
    manifest = load_manifest(root)
    window, version = manifest["window"], manifest["format_version"]
    max_n = max_n_bases(window, manifest.get("args", {}).get("max_n_fraction"))
    for split, info in manifest["splits"].items():
        next_id, windows, n_bases, softmasked_bases = 0, 0, 0, 0
        for entry in info["shards"]:
            tar, idx = root / entry["tar"], root / entry["index"]
            report.shards += 1
            if entry["first_id"] != next_id or entry["last_id"] - entry["first_id"] + 1 != entry["samples"]:
                report.problems.append(f"{tar}: ids {entry['first_id']}..{entry['last_id']} do not follow {next_id - 1}")
            next_id = entry["last_id"] + 1
            if not tar.exists() or not idx.exists():
                report.problems.append(f"{tar if not tar.exists() else idx} is missing")
                continue
            if file_mismatch(tar, entry["bytes"], entry["sha256"], "sha256") is not None:
                report.problems.append(f"{tar}: size or sha256 differs from the manifest (corrupt or replaced)")
                continue
            if sha256_file(idx) != entry["index_sha256"]:
                report.problems.append(f"{idx}: sha256 differs from the manifest")
                continue
            try:
                index = read_index(idx, version)
                if len(index) != entry["samples"]:
                    report.problems.append(f"{idx}: {len(index)} rows, manifest says {entry['samples']} samples")
                    continue
                layout = _check_tar_layout(tar, index, split, entry["first_id"], version)
                if layout:
                    report.problems.append(layout)
                    continue
                reader = ShardReader(tar, idx, version)
                try:
                    problems, n_count, soft_count = _check_samples(reader, split, entry["first_id"], window, max_n,
                                                                   version >= 2)
                    report.problems += problems
                    n_bases += n_count
                    softmasked_bases += soft_count
                finally:
                    reader.close()
            except (ShardFormatError, tarfile.TarError) as exc:
                report.problems.append(f"{tar}: {exc}")
                continue
            windows += entry["samples"]
            report.samples += entry["samples"]
        expected = (info["windows"], info["bases"], info["n_bases"], info.get("softmasked_bases", 0))
        if (windows, windows * window, n_bases, softmasked_bases) != expected and not report.problems:
            report.problems.append(
                f"split {split}: shards hold {windows} windows / {n_bases} N bases / {softmasked_bases} soft-masked "
                f"bases, manifest totals say {info['windows']} / {info['n_bases']} / "
                f"{info.get('softmasked_bases', 0)} (bases {info['bases']})"
            )
    return report


def format_report(report: VerifyReport) -> str:
    if report.ok:
        return f"OK: {report.root}: {report.shards} shards, {report.samples} samples verified"
    listed = "\n  ".join(report.problems[:MAX_LISTED])
    more = f"\n  ... and {len(report.problems) - MAX_LISTED} more" if len(report.problems) > MAX_LISTED else ""
    return (f"FAILED: {report.root}: {len(report.problems)} problem(s):\n  {listed}{more}\n"
            "Reshard (rerun data_prep/shard_genome.py with the same arguments: damaged shards are redone)")
