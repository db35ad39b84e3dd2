"""The I/O study (Table 10, Fig. 9b) and the packed-shard I/O measurement."""
