"""`ModelConfig`: the architecture, one field per `model.*` config key."""

import dataclasses

import jax

from research.errors import UserError

CHOICES = {
    'family': ('decoder', 'encoder', 'encoder_decoder'),
    'pos_encoding': ('learned', 'sinusoidal', 'rope'),
    'norm': ('layernorm', 'rmsnorm'),
    'norm_position': ('pre', 'post'),
    'ffn': ('relu', 'gelu', 'gelu_exact', 'swiglu'),
    'rope_scaling': ('none', 'linear', 'llama3'),
    'dtype': ('auto', 'float32', 'bfloat16'),
    'param_dtype': ('float32', 'bfloat16'),
    'attention': ('auto', 'einsum', 'xla', 'cudnn', 'splash'),
    'remat': ('none', 'full', 'dots'),
}
# ModelConfig fields that are not `model.*` config keys: set by code, never saved.
NOT_CONFIG_KEYS = ('vocab_size', 'backend')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters. `vocab_size` comes from the tokenizer, the rest from `model.*`.

  family: 'decoder' (GPT, causal LM), 'encoder' (BERT, masked LM; Devlin et al. 2019) or
    'encoder_decoder' (Vaswani et al. 2017; num_layers blocks in each of encoder and decoder).
  pos_encoding: 'learned' (GPT-2), 'sinusoidal' (Vaswani et al. 2017: token embeddings scaled by
    sqrt(d_model)) or 'rope' (Su et al. 2021).
  num_kv_heads: key/value heads; 0 means num_heads (MHA), 1 is MQA (Shazeer 2019), else GQA
    (Ainslie et al. 2023).
  norm: 'layernorm' (Ba et al. 2016) or 'rmsnorm' (Zhang & Sennrich 2019); norm_position 'pre'
    (GPT-2) or 'post' (the original Transformer).
  ffn: 'relu' (original), 'gelu' (GPT-2, tanh approximation), 'gelu_exact' (erf; BERT) or
    'swiglu' (Shazeer 2020); hidden width ffn_size, or ffn_multiplier * d_model when 0.
  head_size: the width of one attention head; 0 means d_model / num_heads (Qwen3 sets it apart).
  norm_eps: the epsilon under the square root of every norm (GPT-2 1e-5, Llama 1e-5 or 1e-6).
  qkv_bias, out_bias, ffn_bias: biases on the query/key/value projections (Qwen2; GPT-2), the
    attention output (GPT-2) and the feed-forward layers (GPT-2); off, the layers are bias-free.
  qk_norm: an RMSNorm over each query and key head before RoPE (Qwen3; Dehghani et al. 2023).
  rope_base: RoPE's theta. rope_scaling: 'none'; 'linear' (frequencies / rope_factor); 'llama3'
    (Llama 3.1: wavelengths longer than rope_original_max_len / rope_low_freq_factor divided by
    rope_factor, shorter than rope_original_max_len / rope_high_freq_factor kept, interpolated
    in between).
  sliding_window: > 0: a query sees only the keys of the last sliding_window positions (Mistral).
  dtype: compute dtype ('auto': bfloat16 on GPUs and TPUs, float32 elsewhere; resolved when the
    config is built); softmax and loss stay float32. param_dtype: the parameters' dtype (and so
    the optimiser's: float32 master weights with bfloat16 compute is the usual choice).
  attention: the attention kernel (nn/attention.py `dot_product_attention`, chosen once in
    nn/kernels): 'einsum' (ours, the fastest on CPU), 'xla' or 'cudnn'
    (jax.nn.dot_product_attention; cudnn needs a GPU and bfloat16), 'splash' (TPU Pallas flash
    attention); 'auto' = einsum on CPU, splash on TPU (sequences a multiple of 128), else JAX's.
  remat: what the backward pass keeps of each block's forward (jax.checkpoint): 'none'
    (everything), 'full' (only the block's input; the rest is recomputed), 'dots' (the outputs of
    the projections, i.e. matmuls without batch dimensions; attention and activations are
    recomputed).
  scan_layers: the blocks as one `nn.scan` over layers (parameters stacked [num_layers, ...] under
    'blocks'): compile time independent of depth. `to_layout` converts parameters between the two
    layouts. Needs the same block at every layer (moe_every 0 or 1).
  backend: the platform the model is compiled for ('' = jax.default_backend()); it picks the
    kernels (nn/kernels) and is set by code, e.g. when compiling for a TPU on a CPU host.
  moe_every: 0 = dense; n = every n-th block (blocks n-1, 2n-1, ...) replaces its FFN by
    num_experts FFNs of the same kind and width, moe_top_k of which run per token (noisy top-k
    gating when moe_noisy, Shazeer et al. 2017; at top-1 the gate is Switch's softmax
    probability, Fedus et al. 2021). moe_capacity_factor: slots per expert =
    factor * top_k * seq / num_experts, later tokens of an overfull expert are dropped; <= 0 never
    drops. moe_*_weight: weights of the balancing losses added to the training loss (importance
    and load: Shazeer et al. 2017; switch: Fedus et al. 2021; router z-loss: Zoph et al. 2022).
  """
  vocab_size: int
  family: str = 'decoder'
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0
  d_model: int = 256
  ffn_multiplier: float = 4.0
  max_len: int = 256
  dropout: float = 0.0
  pos_encoding: str = 'learned'
  rope_base: float = 10000.0
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  head_size: int = 0
  ffn_size: int = 0
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  ffn_bias: bool = False
  qk_norm: bool = False
  sliding_window: int = 0
  norm: str = 'layernorm'
  norm_position: str = 'pre'
  ffn: str = 'gelu'
  tie_embeddings: bool = True
  dtype: str = 'auto'
  param_dtype: str = 'float32'
  attention: str = 'auto'
  remat: str = 'none'
  scan_layers: bool = False
  moe_every: int = 0
  num_experts: int = 8
  moe_top_k: int = 2
  moe_noisy: bool = True
  moe_capacity_factor: float = 1.25
  moe_importance_weight: float = 0.1
  moe_load_weight: float = 0.1
  moe_switch_weight: float = 0.0
  moe_z_weight: float = 0.0
  backend: str = ''

  def __post_init__(self):
    if self.dtype == 'auto':
      object.__setattr__(self, 'dtype', 'bfloat16' if self.platform in ('gpu', 'tpu')
                         else 'float32')
    for key, allowed in CHOICES.items():
      if getattr(self, key) not in allowed:
        raise UserError(f'model.{key}={getattr(self, key)!r} is not one of {allowed}; '
                        f'set --config.model.{key} to one of them.')
    for key in ('vocab_size', 'num_layers', 'num_heads', 'd_model', 'max_len'):
      if getattr(self, key) < 1:
        raise UserError(f'model.{key}={getattr(self, key)} must be >= 1.')
    for key in ('head_size', 'ffn_size', 'sliding_window'):
      if getattr(self, key) < 0:
        raise UserError(f'model.{key}={getattr(self, key)} must be >= 0 (0 = off or derived).')
    if not self.head_size and self.d_model % self.num_heads:
      raise UserError(f'model.d_model={self.d_model} is not divisible by model.num_heads='
                      f'{self.num_heads}; pick num_heads that divides d_model.')
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      raise UserError(f'model.num_kv_heads={self.num_kv_heads} must divide model.num_heads='
                      f'{self.num_heads} (0 means num_heads).')
    if self.pos_encoding == 'rope' and self.head_dim % 2:
      raise UserError(f'RoPE needs an even head dimension, got {self.head_dim}.')
    if self.norm_eps <= 0 or self.rope_factor <= 0:
      raise UserError(f'model.norm_eps={self.norm_eps} and model.rope_factor={self.rope_factor} '
                      'must be > 0.')
    if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise UserError(f'model.rope_high_freq_factor={self.rope_high_freq_factor} must be larger '
                      f'than model.rope_low_freq_factor={self.rope_low_freq_factor}.')
    if self.attention == 'cudnn' and (self.dtype != 'bfloat16' or self.platform != 'gpu'):
      raise UserError(f"model.attention='cudnn' needs a GPU and model.dtype='bfloat16' (here: "
                      f"{self.platform}, {self.dtype}); use 'auto' or 'xla' otherwise.")
    if self.attention == 'splash' and self.sliding_window:
      raise UserError(f"model.attention='splash' does not take model.sliding_window="
                      f"{self.sliding_window}; use 'auto' or 'xla'.")
    if self.attention == 'splash' and self.platform != 'tpu':
      raise UserError(f"model.attention='splash' is a TPU kernel (here: {self.platform}); use "
                      "'auto' or 'xla' otherwise.")
    if self.scan_layers and self.moe_every > 1:
      raise UserError(f'model.scan_layers=True needs the same block at every layer, but '
                      f'model.moe_every={self.moe_every} mixes dense and MoE blocks; set moe_every '
                      'to 0 or 1, or scan_layers=False.')
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f'model.dropout={self.dropout} must be in [0, 1).')
    self._check_moe()

  def _check_moe(self):
    if not 0 <= self.moe_every <= self.num_layers:
      raise UserError(f'model.moe_every={self.moe_every} must be in [0, model.num_layers='
                      f'{self.num_layers}]; 0 is dense, n makes every n-th block a MoE.')
    if not 1 <= self.moe_top_k <= self.num_experts:
      raise UserError(f'model.moe_top_k={self.moe_top_k} must be in [1, model.num_experts='
                      f'{self.num_experts}]; lower moe_top_k or raise num_experts.')
    for key in ('moe_importance_weight', 'moe_load_weight', 'moe_switch_weight', 'moe_z_weight'):
      if getattr(self, key) < 0:
        raise UserError(f'model.{key}={getattr(self, key)} must be >= 0.')
    if self.moe_load_weight and not self.moe_noisy:
      raise UserError(f'model.moe_load_weight={self.moe_load_weight} needs model.moe_noisy=True '
                      '(the load loss is defined through the gate noise); set moe_load_weight=0 '
                      'or moe_noisy=True.')

  @property
  def platform(self) -> str:
    """The platform the kernels are chosen for: `backend`, else JAX's default backend."""
    return self.backend or jax.default_backend()

  @property
  def head_dim(self) -> int:
    return self.head_size or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def ffn_dim(self) -> int:
    return self.ffn_size or int(self.ffn_multiplier * self.d_model)

  def is_moe_layer(self, layer: int) -> bool:
    return self.moe_every > 0 and (layer + 1) % self.moe_every == 0
