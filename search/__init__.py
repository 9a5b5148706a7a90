"""AutoDiffusion: training-free evolutionary search of time steps and skippable blocks; fitness is a callable."""
from dstudio.search.evolution import EvolutionConfig, SearchResult, evolve
from dstudio.search.space import Candidate, SearchSpace

__all__ = ["Candidate", "EvolutionConfig", "SearchResult", "SearchSpace", "evolve"]
