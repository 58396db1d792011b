#!/usr/bin/env python
"""Genome FASTA + split BED -> WebDataset shards of token ids (see `--help`; no arguments: the sample).

    python data_prep/shard_genome.py                                   # embedded sample -> data/shards/sample
    python data_prep/shard_genome.py --fasta hg38.ml.fa.gz --bed sequences_human.bed \
        --out data/shards/hg38 --workers 8                             # the reference pretraining data
    python data_prep/shard_genome.py --verify data/shards/hg38
"""

import sys
from pathlib import Path

try:
    import caduceus_dist  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caduceus_dist.prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
