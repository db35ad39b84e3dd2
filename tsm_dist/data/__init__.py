"""Video data: file lists and converters (``filelist``, ``convert``), clip sampling and sharding
(``sampling``, ``clip_plan``, ``sharding``), the loaders (``video_loader.build_video_loader`` builds the
DALI, PyAV or random one), packed shards (``pack/``) and the synthetic temporal-order data set
(``synthetic``). docs/data.md has the formats and rules."""
