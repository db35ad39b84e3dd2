"""The studies of the paper's scalability section: ring-allreduce cost model, allreduce microbenchmark,
machine profiles, sweep plans, local rank runner, and the collection into tables and plots."""
