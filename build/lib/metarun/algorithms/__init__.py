"""Meta-learning algorithms: one file per algorithm, each a `MetaAlgorithm`."""
