from .dit import DiffusionTransformer as DiffusionTransformer
