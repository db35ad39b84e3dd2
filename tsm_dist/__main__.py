from tsm_dist.cli import main

raise SystemExit(main())
