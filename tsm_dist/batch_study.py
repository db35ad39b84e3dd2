"""``python -m tsm_dist.batch_study``: the batch-size study (the code is in :mod:`tsm_dist.studies.batch_size.study`)."""
from tsm_dist.studies.batch_size.study import main

if __name__ == "__main__":
    raise SystemExit(main())
