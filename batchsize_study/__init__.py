"""batchsize_study: does a larger batch give a lower loss in a given number of optimizer steps,
once its learning rate is derived from a measured stability limit?"""

__version__ = "0.1.0"
