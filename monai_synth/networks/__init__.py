from .autoencoder import LaplaceAutoencoderKL as LaplaceAutoencoderKL
from .dit import DiffusionTransformer as DiffusionTransformer
from .embedding import PatientEmbeddingNet as PatientEmbeddingNet
