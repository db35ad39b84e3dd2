"""The scaling study (Table 12, Fig. 9c, Fig. 12): sweep, its runs, collection, the ring-allreduce cost model, projection, machine profiles and the allreduce microbenchmark."""
