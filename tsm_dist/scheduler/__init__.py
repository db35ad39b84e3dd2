"""LSF and Slurm job scripts: one template rendered for every job (render) and the one path that submits, waits for and reads back study jobs (submit)."""
