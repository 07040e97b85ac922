"""Typed configuration schema: one dataclass per config section.

The values live in the YAML files under configs/; these classes only say which keys
exist and what type each has. A key missing from the merged YAML is an error, so every
number has exactly one home (the YAML), never a silent default in code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RunConfig:
    name: str                 # run folder name under root
    root: str                 # where run folders live
    seed: int                 # global seed for everything that draws random numbers
    store: str                # shared step outputs ("" = <root>/store), one folder per signature
    sweep: str                # name of the sweep this run is a point of ("" = none)
    sweep_point: str          # the point's overrides, e.g. "stage3.lr=0.001 stage3.epochs=4"


@dataclass
class DataConfig:
    source: str               # folder of music files ("" = the generated demo corpus)
    demo_songs: int           # songs in the generated demo corpus
    demo_seconds: float       # length of each demo song
    sample_rate: int          # target rate after resampling (24000 or 12000)
    channels: int             # 1 = downmix to mono, 2 = stereo (mono input is duplicated)
    chunk_seconds: float      # fixed chunk length
    tail: str                 # "drop" or "pad" the last partial chunk
    min_seconds: float        # files shorter than this are skipped
    silence_db: Optional[float]  # chunks quieter than this RMS (dBFS) are skipped; null = keep all
    max_chunks_per_song: int  # 0 = no cap
    dtype: str                # "float32" or "int16" for the stored chunk arrays
    block_seconds: float      # decode block size (never the whole file in memory)
    num_shards: int           # chunk job-array width
    workers: int              # processes per shard on a local run
    max_failed_share: float   # a shard with a larger share of failed files fails


@dataclass
class PairsConfig:
    target: str               # "next": chunk at position input + 1 + gap; "same": the input
    gap: int                  # target position = input position + 1 + gap (next only)
    stride: int               # inputs: chunks whose position in the song is a multiple of this
    val_fraction: float       # share of songs held out for validation
    shuffle_targets: bool     # pair inputs with a random continuation from another song (next only)


@dataclass
class AugmentConfig:
    variants: int             # augmented copies encoded per training chunk (0 = off)
    gain_db: list             # [low, high] gain range in dB
    pitch_semitones: list     # [low, high] pitch shift in semitones
    stretch: list             # [low, high] time-stretch factor
    noise_snr_db: list        # [low, high] SNR of added noise
    mix_db: list              # [low, high] level of the quiet second song, relative dB
    types: list               # which of gain, pitch, stretch, noise, mix are used
    silent_db: float          # a variant with RMS below this (dBFS) is dropped as silent
    clip_peak: float          # a variant with |peak| above this is dropped as clipped
    vocoder_n_fft: int        # phase-vocoder STFT size (time stretch and pitch shift)
    vocoder_hop: int          # phase-vocoder hop


@dataclass
class MelConfig:
    window_hops: int          # STFT window = this many hops (hop = sample_rate / 75)
    log_floor: float          # mel power is clamped to this before the log
    griffin_lim_iters: int    # Griffin-Lim iterations when decoding mel frames to audio


@dataclass
class EncodeConfig:
    codec: str                # "encodec" or "mel"
    weights_dir: str          # local folder holding encodec_24khz-d7cc33bc.th
    pretrained: bool          # false = random weights (tests only; recorded in the manifest)
    bandwidth: float          # EnCodec target bandwidth in kbps
    use_codes: bool           # store RVQ codes instead of continuous latents
    batch_size: int
    shard_size: int           # chunks per latent shard file
    device: str               # "auto", "cpu" or "cuda"
    mel: MelConfig            # parameters of the mel codec
    augment: AugmentConfig


@dataclass
class TransformerConfig:
    latent_dim: int           # 128 for both codecs
    d_model: int
    layers: int
    heads: int
    ff_mult: int
    dropout: float
    cascade_stages: int       # creative mode cascade depth
    max_frames: int           # positional table size


@dataclass
class VaeModelConfig:
    levels: int               # hierarchy depth (3)
    latent_channels: int
    downsample: list          # time downsampling factor per level, e.g. [2, 4, 8]
    decoder: str = "linear"   # linear (levels repeated up, summed) | conv (interpolated, then
                              # residual convs before and after the output projection)
    decoder_layers: int = 3   # conv decoder: dilated residual blocks (dilation 1, 2, 4, ...)


@dataclass
class DiscriminatorConfig:
    scales: list              # time pooling per sub-discriminator, e.g. [1, 2, 4]
    channels: int
    layers: int
    spectral_norm: bool
    minibatch_features: int   # 0 = no minibatch discrimination
    minibatch_kernel_dim: int  # size of each minibatch-discrimination kernel
    kernel_size: int          # conv kernel over time (odd)
    stride: int               # time stride of every conv after the first
    leaky_slope: float        # LeakyReLU negative slope
    dilated_layers: int = 0   # residual dilated convs (dilation 2, 4, 8, ...) after the strided
                              # stack: a receptive field of several bars (0 = off)


@dataclass
class GeneratorConfig:
    skip: str = "mean"        # mean (the input's time mean added to the output) | learned
                              # (the data's mean + a per-channel gate, from 1, on the input's
                              # deviation from it) | none (the data's mean only)


@dataclass
class ModelConfig:
    transformer: TransformerConfig
    vae: VaeModelConfig
    discriminator: DiscriminatorConfig
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class LossConfig:
    latent_l1: float          # continuation: output vs target
    latent_mse: float
    spectral: float           # FFT-magnitude loss over time
    freq_weighted: bool       # MusicVAE band weights on reconstruction
    output_range: float       # penalty for outputs outside the target's (creative: both) range
    content: float            # creative: the input's time pattern in every channel
    style: float              # creative: the target's level and spread in every channel
    balance: float            # creative-agent mask terms (creative mode only)
    coverage: float
    overlap: float            # mean(m_in * m_tgt): pushes the masks apart
    temporal_diversity: float
    min_mask_std: float       # hinge level for the temporal-diversity term
    level: float = 0.0        # batch level (mel: decoded log power) vs the targets'; not
                              # faded by the stage-3 curriculum (0 = off)


@dataclass
class KlConfig:
    beta: float
    anneal_epochs: int
    free_bits: float          # nats per latent channel per level


@dataclass
class GanConfig:
    loss: str                 # "bce", "hinge" or "lsgan"
    label_smoothing: float    # real label = 1 - smoothing (bce)
    feature_matching: float
    adv_weight: float         # final adversarial weight
    adv_ramp_epochs: int      # linear ramp from 0 to adv_weight
    d_pretrain_epochs: int
    lr_d: float
    d_steps: int
    recon_fade: bool          # paired losses weighted by (1 - alpha); false = the seeds' fixed weights
    feature_matching_mode: str  # "paired" (the seeds') or "batch" (batch statistics)
    moment_matching: float    # weight of the latent batch-statistics loss (0 = off)
    r1_gamma: float           # zero-centred gradient penalty on reals, weight gamma/2 (0 = off)


@dataclass
class CurriculumConfig:
    rate: float               # pure-GAN alpha per epoch (0 = off)
    start_epoch: int          # first epoch with noise (epochs counted from 1)
    cap: float
    noise: str                # "sample_std" (the seed's: zero mean, each sample's std) or
                              # "data" (per-channel mean and std of the training latents)


@dataclass
class GateConfig:
    require_finite: bool
    min_improvement: float    # best val loss this fraction below epoch 1's (0 = off) ...
    max_val_loss: Optional[float]  # ... or at most this; null = not used
    beat_baselines: bool      # stage 1: best val loss below the best trivial baseline ...
    min_margin: float         # ... by this fraction: 1 - best / min(baselines) >= min_margin
    last_epochs: int          # a collapse must last the final N epochs (D pre-training excluded)
    # collapse rules, each null = off:
    kl_floor_tolerance: Optional[float]  # posterior: every level's val KL <= free_bits + this
    min_d_loss: Optional[float]          # D collapse: train D loss below this
    min_diversity_ratio: Optional[float]  # mode collapse: val_diversity_ratio below this
    # The two below have defaults only so that configs recorded before they existed (old run
    # folders, checkpoints) still load; the stage files set them.
    min_order_gain: Optional[float] = None  # stage 1: permuting the input's frames must raise
                                            # the val loss by this share (order_probe.json)
    on_fail: str = "stop"     # a failed gate: "stop" (exit 3, the chain stops) or "warn"
                              # (gate.json says so, the stage ends OK and the chain goes on)


@dataclass
class BaselineConfig:
    min_period_s: float       # `period` baseline: shortest period searched (longest: half the chunk)
    bar_s: float              # `last_bar` baseline: the input's last this-many seconds repeated


@dataclass
class NextFrameConfig:
    guide_lags: int           # the input's frames 1..k periods back (at the phase of the frame to
                              # predict) fed to each position, prediction
                              # = the frame one period back + the network's (0 = no guide:
                              # the previous frame + the network's)
    min_lag: int              # shortest period searched, in frames (longest: half the input)
    mix: bool = False         # the skip is a learned per-channel weighting of the guide frames
    mix_gain: float = 1.0     # those weights are stored divided by this (Adam moves them faster)
    sampled: float = 0.0      # training: share of the target frames the second causal pass sees
                              # as the model's own predictions (scheduled sampling; 0 = off)


@dataclass
class StageConfig:
    enabled_parts: list       # subset of ["transformer", "vae", "gan"]
    mode: str                 # "continuation" or "creative"
    epochs: int
    batch_size: int           # global batch (split over ranks)
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    checkpoint_every: int     # epoch_<n>.pt every k epochs
    sample_every: int         # log generated samples every k epochs (0 = never)
    early_stop_patience: int  # 0 = off
    augment_prob: float       # chance a training sample comes from an augmented variant
    anti_cheat_noise: float   # std of noise added to the target view in creative mode
    num_workers: int
    detect_anomaly: bool
    deterministic: bool       # deterministic kernels and fixed DDP gradient buckets: exact resumes
    ema_decay: float          # moving average of the generator's weights (0 = off)
    grad_accum_steps: int     # micro-batches per optimizer step (1 = off)
    precision: str            # "bf16", "fp16" (CUDA only) or "fp32"; the CPU runs fp32
    keep_last: int            # full epoch_<n>.pt files kept (0 = all); stage 3 keeps D of older ones
    log_every_steps: int      # train/ losses to MLflow every N optimizer steps (0 = off)
    continue_from: str        # checkpoint to continue with this schedule ("" = off)
    loss: LossConfig
    kl: Optional[KlConfig]
    gan: Optional[GanConfig]
    curriculum: CurriculumConfig
    gate: GateConfig
    # stage 1's structure-aware trivial baselines (jobs/validation.py); null/absent in stages
    # that compute none
    baselines: Optional[BaselineConfig] = None
    # "chunk": the whole target chunk from the input in one non-causal pass; "next_frame":
    # causal next-frame prediction, teacher-forced in training, free-running in validation
    # (jobs/next_frame.py); continuation mode only (a creative stage ignores it). Defaults
    # only so that configs recorded before they existed load.
    objective: str = "chunk"
    next_frame: Optional[NextFrameConfig] = None   # settings of the next_frame objective


@dataclass
class AuditConfig:
    gen_epoch: int            # generator checkpoint to audit (0 = last saved)
    first_epoch: int          # discriminator range (0 = all)
    last_epoch: int
    batch_size: Optional[int]  # null = per-rank training batch (stage3.batch_size / world_size)
    collapse_d_loss: float    # D loss (per BCE term) below this at every epoch = D collapse
    chance_margin: float      # D accuracy within 0.5 +- this = D cannot tell reals from fakes
    use_ema: bool             # the generator's EMA weights when the checkpoint has them
    clips: int                # validation clips per pick (scored in batches of batch_size)
    picks: int                # seeded picks; each D's figures are the mean over them
    min_twin_auc: float       # a D counts in the verdict only if it tells reals from every twin


@dataclass
class EvaluateConfig:
    n: int                    # generated and real samples compared
    seed: int                 # noise seed (repeatable numbers)
    checkpoint: str           # "" = the run's stage3 last.pt (run_folder.default_checkpoint)
    fft_size: int             # STFT size for spectral flatness
    use_ema: bool             # the generator's EMA weights when the checkpoint has them
    picks: int                # seeded picks of clips; figures are the mean (and spread) over them


@dataclass
class GenerateConfig:
    n: int
    temperature: float
    seed: int
    checkpoint: str           # "" = the run's stage3 last.pt (run_folder.default_checkpoint)
    griffin_lim_iters: int
    use_ema: bool             # the generator's EMA weights when the checkpoint has them


@dataclass
class MlflowConfig:
    tracking_uri: str         # "" = sqlite file in the run root
    experiment: str
    system_metrics: bool
    busy_patience_s: float    # how long logging waits out a busy ("database is locked") store


@dataclass
class Resources:
    time_min: int
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int


@dataclass
class ClusterConfig:
    executor: str             # "auto", "local" or "slurm"
    partition: str
    account: str
    qos: str
    setup: list               # shell lines run before each job, e.g. module load
    signal_delay_s: int       # USR2 this long before the time limit
    max_requeues: int
    allow_cpu_fallback: bool  # a training step that asked for GPUs may run on the CPU (gloo)
    sbatch_extra: dict        # more sbatch options for every job, e.g. {constraint: a100, exclude: node7}
    steps: dict[str, Resources]  # step name -> Resources


@dataclass
class Config:
    run: RunConfig
    data: DataConfig
    pairs: PairsConfig
    encode: EncodeConfig
    model: ModelConfig
    stage1: StageConfig
    stage2: StageConfig
    stage3: StageConfig
    audit: AuditConfig
    generate: GenerateConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig
    cluster: ClusterConfig
    extra: dict = field(default_factory=dict)  # free-form notes, never read by code
