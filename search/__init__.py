"""AutoDiffusion: training-free evolutionary search of time steps and skippable blocks; fitness is a callable."""
from dstudio.search.cost import block_costs
from dstudio.search.evolution import EvolutionConfig, SearchResult, breed, evaluate, evolve, initial_population
from dstudio.search.space import Budget, Candidate, SearchSpace

__all__ = ["Budget", "Candidate", "EvolutionConfig", "SearchResult", "SearchSpace", "block_costs", "breed", "evaluate",
           "evolve", "initial_population"]
