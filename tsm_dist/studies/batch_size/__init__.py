"""The batch-size study (Table 12, Fig. 11, Fig. 13): its runs, local and scheduler submission, and the report."""
