"""asv benchmarks of instnorm_numba (see asv.conf.json and README "Contributing: benchmarks")."""
