"""music_transformer on the 8 GPUs of one host: data parallel over all 8 (the model's 25 M
parameters fit on every GPU, so replicating them is the simplest fast layout).

    bash launch/multi_gpu.sh --config configs/gpu_8.py --workdir /scratch/mt
"""
from configs import music_transformer


def get_config():
  config = music_transformer.get_config()
  config.mesh.ici_parallelism = (-1, 1, 1)
  config.mesh.dcn_parallelism = (1, 1, 1)
  config.data.batch_size = 64
  return config
