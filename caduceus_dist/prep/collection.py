"""Genome collections: several genomes sharded by one command, one shard root per genome plus a collection manifest.

    python data_prep/shard_genome.py --collection genomes.yaml --out DIR --workers 4

genomes.yaml lists the genomes (`name`, `fasta`, optional `species`, `taxon`) under `genomes:`; every
other key is a sharder setting (`window`, `bed`, `valid_chroms`, `valid_fraction`, `contigs`, ...: the
options of a single-genome run, with underscores), given at the top for every genome or per genome to
override. Relative paths are relative to the YAML file. Genome NAME goes to DIR/NAME, sharded exactly
as `shard_genome.py --fasta ... --out DIR/NAME` would, so a rerun resumes each genome where it stopped.
Genomes are sharded in parallel, one process each (up to `--workers`). DIR/collection.json is written
last: what each genome is and holds, for `data.sources` and for people.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import yaml

from caduceus_dist import __version__
from caduceus_dist.fsio import atomic_write
from caduceus_dist.prep.fasta import FastaError
from caduceus_dist.prep.output import ShardingError
from caduceus_dist.prep.sharding import SAMPLE_DIR, ShardConfig, ensure_sample_shards, shard_genome
from caduceus_dist.prep.splits import SplitError
from caduceus_dist.prep.tiling import TilingError
from caduceus_dist.shard_format import ShardFormatError

COLLECTION_NAME = "collection.json"
COLLECTION_FORMAT = "caduceus-dist-collection"
GENOME_ONLY = ("name", "fasta", "species", "taxon")  # per genome; every other key is a ShardConfig setting
SETTINGS = tuple(f.name for f in dataclasses.fields(ShardConfig)
                 if f.name not in ("fasta", "out", *ShardConfig.RUN_ONLY))
PATH_SETTINGS = ("bed",)
SAMPLE_COLLECTION = SAMPLE_DIR / "mixture.yaml"
SAMPLE_COLLECTION_OUT = "data/shards/mixture"


@dataclasses.dataclass(frozen=True)
class Genome:
    name: str
    species: str | None
    taxon: int | str | None
    config: ShardConfig


def _fail(path: Path, where: str, what: str) -> ShardingError:
    return ShardingError(f"collection {path}: {where}: {what}")


def load_collection(path: str | Path, out: str | Path) -> list[Genome]:
    """The genomes of a collection file, each with the ShardConfig that writes it to OUT/NAME; one-line errors
    naming the file, the genome and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ShardingError(f"collection {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ShardingError(f"collection {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("genomes"), list) or not data["genomes"]:
        raise ShardingError(f"collection {path}: expected a mapping with a non-empty list 'genomes:' "
                            f"(each with name and fasta)")
    defaults = {k: v for k, v in data.items() if k != "genomes"}
    unknown = sorted(set(defaults) - set(SETTINGS))
    if unknown:
        raise _fail(path, "top level", f"unknown key(s) {unknown}; settings are {list(SETTINGS)}")
    genomes, names = [], set()
    for i, entry in enumerate(data["genomes"]):
        where = f"genomes[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, where, "expected a mapping with name and fasta")
        name = entry.get("name")
        where = f"genomes[{i}] ({name})" if name else where
        unknown = sorted(set(entry) - set(SETTINGS) - set(GENOME_ONLY))
        if unknown:
            raise _fail(path, where, f"unknown key(s) {unknown}; keys are {list(GENOME_ONLY + SETTINGS)}")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise _fail(path, where, f"'name' must be a directory name (no '/'), got {name!r}")
        if name in names:
            raise _fail(path, where, f"name {name!r} is used twice")
        names.add(name)
        if not entry.get("fasta"):
            raise _fail(path, where, "'fasta' is missing")
        settings = {**defaults, **{k: v for k, v in entry.items() if k in SETTINGS}}
        for key in ("fasta", *PATH_SETTINGS):
            value = entry.get("fasta") if key == "fasta" else settings.get(key)
            if value is not None:
                settings[key] = str(path.parent / value) if not Path(value).is_absolute() else str(value)
        try:
            config = ShardConfig(out=str(Path(out) / name), quiet=True, **settings)
        except TypeError as err:
            raise _fail(path, where, str(err)) from None
        genomes.append(Genome(name, entry.get("species"), entry.get("taxon"), config))
    return genomes


def _shard_one(config: ShardConfig) -> dict:
    return shard_genome(config)


def shard_collection(path: str | Path, out: str | Path, workers: int = 1, overwrite: bool = False,
                     report=print) -> dict:
    """Shard every genome of the collection at `path` into OUT/NAME (`workers` genomes at a time); returns
    the collection manifest (also written to OUT/collection.json)."""
    if workers < 1:
        raise ShardingError(f"--workers must be >= 1, got {workers}")
    genomes = load_collection(path, out)
    configs = {g.name: dataclasses.replace(g.config, overwrite=overwrite) for g in genomes}
    manifests: dict[str, dict] = {}
    if workers == 1:
        for name, config in configs.items():
            manifests[name] = _checked(name, lambda config=config: shard_genome(config))
            report(f"  {name}: {_counts(manifests[name])}")
    else:
        with ProcessPoolExecutor(min(workers, len(configs)), mp_context=get_context("fork")) as pool:
            futures = {pool.submit(_shard_one, config): name for name, config in configs.items()}
            try:
                for future in as_completed(futures):
                    name = futures[future]
                    manifests[name] = _checked(name, future.result)
                    report(f"  {name}: {_counts(manifests[name])}")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    collection = {
        "format": COLLECTION_FORMAT, "format_version": 1,
        "created_by": f"caduceus-dist {__version__} data_prep/shard_genome.py --collection",
        "collection": str(path), "collection_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "genomes": [{"name": g.name, "species": g.species, "taxon": g.taxon, "shards": g.name,
                     "assembly": manifests[g.name]["assembly"], "window": manifests[g.name]["window"],
                     "splits": {split: {k: info[k] for k in ("windows", "bases", "n_bases", "softmasked_bases")}
                                for split, info in manifests[g.name]["splits"].items()}}
                    for g in genomes],
    }
    atomic_write(Path(out) / COLLECTION_NAME, json.dumps(collection, indent=1))
    return collection


def _checked(name: str, run) -> dict:
    """Run one genome's sharding; the errors a user can cause name the genome."""
    try:
        return run()
    except (FastaError, SplitError, TilingError, ShardingError, ShardFormatError) as err:
        raise ShardingError(f"genome '{name}': {err}") from None


def _counts(manifest: dict) -> str:
    return ", ".join(f"{split} {info['windows']} windows ({info['softmasked_bases']} soft-masked bases)"
                     for split, info in manifest["splits"].items())


def ensure_sample_data(roots: list[str]) -> None:
    """The quickstart convenience, for each form of recipe: the default sample location is sharded on first use,
    and so is the embedded collection when a recipe reads its genomes from the default place (rank 0 only)."""
    for root in roots:
        ensure_sample_shards(root)
    default = Path(SAMPLE_COLLECTION_OUT).resolve()
    wanted = [Path(root).resolve() for root in roots if Path(root).resolve().parent == default]
    if wanted and not all((root / "manifest.json").exists() for root in wanted):
        print(f"sharding the embedded three-species collection into {SAMPLE_COLLECTION_OUT} (first run only)", flush=True)
        shard_collection(SAMPLE_COLLECTION, SAMPLE_COLLECTION_OUT)
