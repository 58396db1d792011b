"""Offline preparation: genome FASTA + split rule -> shards (`data_prep/shard_genome.py` is the entry point).

    fasta.py     streaming FASTA reader (plain, gzip, BGZF in parallel), soft-masking upper-cased
    splits.py    split rules: a split BED, held-out contigs, contig filters
    tiling.py    how BED rows or contigs become fixed-length windows (registry: reference, tile)
    sharding.py  the pipeline: windows -> packed tar members -> shards -> manifest
    output.py    crash-safe output directory: partial files, journal, resumable reruns
    workers.py   the thread / process pool shared by decompression and packing
    verify.py    `--verify`: every shard against the manifest, byte for byte
    download.py  resumable `--download` of the reference inputs
    cli.py       the command line

Nothing here imports torch or the loader (`caduceus_dist.data`); the two meet only in
`caduceus_dist.shard_format` (docs/shard-format.md).
"""
