"""``python -m tsm_dist.io_study``: the I/O study's documented entry point (``tsm_dist/studies/data_io/study.py``)."""
from tsm_dist.studies.data_io.study import main

if __name__ == "__main__":
    raise SystemExit(main())
