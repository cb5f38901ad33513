from .linear_gaussian import LinearGaussianProblem, gaussian_kl
