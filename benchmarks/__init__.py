"""Side-by-side benchmarks of the in-process reference pipeline and the Triton deployment (`make bench`)."""
