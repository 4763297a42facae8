"""The typed configuration: the single source of every default and type (hydra structured configs).

Each dataclass is one config group option or one command's root config; they are registered in
hydra's ConfigStore by :mod:`storefed.config.store`. YAML files under ``conf/`` are presets only:
they name a schema here and override a few values (e.g. ``conf/data/amazon.yaml``).
Ranges are checked by :mod:`storefed.config.validate` when the config is composed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


# --- task (what is learned) -------------------------------------------------------------------
@dataclass
class RecommenderConfig:
    """Next-item recommender. DP unit: one customer (their capped history).

    ``model=history``: a history encoder trained by DP-SGD. ``model=item_item``: an item-item
    (EASE) model computed from two released statistics: item popularity, then the co-occurrence of
    the ``candidate_items`` most popular items (each customer's row of norm 1), released through
    secure aggregation (privacy.mode=distributed, or exact without noise under privacy=none)."""

    name: str = "recommender"  # the option's name: set by task=recommender, not to be overridden
    model: str = "history"  # history | item_item
    # history: next_item (one random cut of the history per step) | multinomial (the whole history per step)
    objective: str = "next_item"
    input_dropout: float = 0.5  # multinomial: share of a customer's items hidden from the input
    catalog_features: bool = True  # history: add a category embedding and category score when the catalog has categories
    holdout: str = "test"  # test | validation: score on each customer's last training item instead
    # item_item, chosen on the validation split (docs/results.md): null = the value for the privacy setting
    candidate_items: Optional[int] = None  # items the co-occurrence covers (0 = all); null: all without DP, 50 DP
    ease_lambda: Optional[float] = None  # L2 penalty / mean co-occurrence diagonal; null: 100 without DP, 3 under DP
    popularity_weight: Optional[float] = None  # weight of popularity / max popularity; null: 0 without DP, 0.1 DP
    embedding_dim: int = 32  # history: size of the item (and category) embeddings
    max_history: int = 50  # a customer's history is capped to their most recent items
    # history: 0 = one embedding row and one output row per catalog item; > 0 = hashed item tables of
    # this many rows each (an item is the sum of task.item_hashes rows): size independent of the catalog
    item_buckets: int = 0
    item_hashes: int = 2  # item_buckets > 0: rows per item, chosen by fixed public hash functions of its index
    # item_buckets > 0: above this many catalog items, train on a sampled softmax over the target and this
    # many uniform negatives shared by the batch; at most this many items: the exact full softmax
    sampled_negatives: int = 20000
    top_k: int = 10  # K of the full-ranking metrics hr@K and ndcg@K
    sampled_candidates: int = 100  # secondary, labelled sampled-100 protocol
    epochs: int = 10  # local epochs per round
    batch_size: int = 256  # expected Poisson batch size
    lr: float = 0.03  # learning rate of local training
    optimizer: str = "adam"  # adam | sgd
    # privacy.mode=distributed: before training, one DP release of item popularity through the same
    # integer path (each customer's distinct items, L2 norm 1) initialises the output bias
    popularity_prior: bool = False
    # noise std / per-customer L2 bound of that release; null: planned so that the release costs
    # task.prior_budget_fraction of privacy.epsilon (alone)
    prior_noise_multiplier: Optional[float] = None
    # the share of privacy.epsilon that release costs; null: 0.15 (history), 0.7 (item_item: about equal
    # noise on its two releases)
    prior_budget_fraction: Optional[float] = None

    def resolved(self, private: bool) -> "RecommenderConfig":
        """This config with every null item_item setting replaced by the validated default for the
        privacy setting (``private``: DP noise on the releases; otherwise exact sums)."""
        from dataclasses import replace

        defaults = ITEM_ITEM_DP_DEFAULTS if private else ITEM_ITEM_EXACT_DEFAULTS
        if self.model != "item_item":
            defaults = {"prior_budget_fraction": 0.15}
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


# item_item settings chosen on the validation split of Amazon MI (docs/results.md); the candidate
# count without DP is the whole catalog (0 = every item)
ITEM_ITEM_DP_DEFAULTS = {"candidate_items": 50, "ease_lambda": 3.0, "popularity_weight": 0.1,
                         "prior_budget_fraction": 0.7}
ITEM_ITEM_EXACT_DEFAULTS = {"candidate_items": 0, "ease_lambda": 100.0, "popularity_weight": 0.0,
                            "prior_budget_fraction": 0.7}


@dataclass
class ReviewConfig:
    """Review sentiment classifier (transformers BERT). DP unit: one reviewer (default), or one review."""

    name: str = "review"  # the option's name: set by task=review, not to be overridden
    labels: str = "polarity"  # polarity (1-2 neg, 4-5 pos, 3 dropped) | three_class
    # frozen: pretrained encoder, features cached per merchant, DP-trained linear head (federated: the head);
    # lora: the same encoder with LoRA adapters; scratch: a small BERT on a hashing tokenizer
    encoder: str = "frozen"
    pretrained_dir: Optional[str] = None  # frozen/lora: a local BERT-family checkpoint; null: bundled all-MiniLM-L6-v2
    max_length: int = 256  # tokens per review (all-MiniLM-L6-v2's own max_seq_length)
    embed_batch_size: int = 32  # frozen: reviews per encoder forward pass
    prior_tau: float = 0.75  # frozen: decide by argmax(logits - tau * learned log prior); 0 = argmax, 1 = balanced
    holdout: str = "test"  # test | validation: score on a validation split carved from the training reviews
    validation_fraction: float = 0.2  # holdout=validation: share of each merchant's training reviews
    vocab_size: int = 4096  # scratch: hashing tokenizer buckets (learns nothing from merchant data)
    hidden_size: int = 32  # scratch: BERT hidden size (a multiple of num_heads)
    num_layers: int = 1  # scratch: transformer layers
    num_heads: int = 2  # scratch: attention heads per layer
    intermediate_size: int = 64  # scratch: feed-forward size of each layer
    initializer_range: float = 0.02  # scratch: std of the random weight initialisation
    class_weights: Optional[List[float]] = None  # fixed loss weight per class, never from data
    test_fraction: float = 0.2  # share of each merchant's reviews held out for testing (none below 5)
    max_reviews_per_user: int = 4  # reviewer unit (the default): a reviewer's most recent reviews in one unit
    pooling: str = "mean"  # scratch and lora: mean | cls
    lora_r: int = 8  # lora: rank of the adapters
    lora_alpha: int = 16  # lora: adapter scaling alpha
    # lora: names of the encoder modules that get adapters
    lora_targets: List[str] = field(default_factory=lambda: ["query", "value"])
    # frozen head, chosen on the validation split (docs/results.md, runs of simulations/evaluation/search.py)
    epochs: int = 12  # local epochs per round
    batch_size: int = 2048  # expected Poisson batch: a typical merchant's reviews all at once (full-batch DP-GD)
    lr: float = 0.1  # learning rate of local training
    optimizer: str = "adam"  # adam | sgd


TaskConfig = RecommenderConfig | ReviewConfig


def resolved_task(task: Any, private: bool) -> Any:
    """``task`` with its privacy-dependent nulls filled (only the recommender has any)."""
    return task.resolved(private) if isinstance(task, RecommenderConfig) else task


# --- privacy --------------------------------------------------------------------------------------
@dataclass
class PrivacyConfig:
    """Record-level DP at every merchant (Opacus, Poisson sampling), plus coordinator-side options."""

    enabled: bool = True  # record-level DP at the merchants; false (privacy=none): no DP guarantee at all
    # each customer's budget at each merchant across every task in privacy.person_tasks, all rounds and runs
    # (enforced by the merchant; null: reported, not enforced, and privacy.epsilon must be set)
    person_epsilon: Optional[float] = 8.0
    person_tasks: List[str] = field(default_factory=lambda: ["recommender", "review"])  # tasks sharing it
    # this task's budget per unit at each merchant, across all rounds and runs; null: its share of
    # privacy.person_epsilon (n tasks composed in RDP reach it: 5.32 each for 8 split in two, delta 1e-5)
    epsilon: Optional[float] = None
    delta: float = 1e-5  # must be below 1/(DP units at the merchant)
    # null: the task's unit (recommender: customer; review model: reviewer); user: one customer's whole
    # contribution; review: one review (a customer's k reviews then compose only by group privacy)
    unit: Optional[str] = None
    max_grad_norm: float = 1.0  # per-unit L2 clipping norm
    noise_multiplier: str = "auto"  # auto (planned so planned_rounds fit the budget) or a number > 0
    planned_rounds: Optional[int] = None  # default: 2x expected participations (min 2, max rounds)
    accountant: str = "rdp"  # rdp | prv (Opacus accountants)
    # per-unit clipping: auto (book where every trainable layer is Linear/Embedding, the recommenders; else
    # ghost) | book (book-keeping, one backward pass) | ghost (Opacus ghost clipping, two) | hooks (Opacus);
    # privacy.mode=distributed: auto/book as above, else (and ghost) Opacus hooks
    grad_sample_mode: str = "auto"
    ledger_dir: Optional[str] = None  # default: <run_dir>/ledgers
    # local: each merchant's update is DP on its own. distributed: each round is ONE DP-SGD step over the
    # union of the merchants' units, merchants add integer Skellam noise shares, secure aggregation sums them
    mode: str = "local"  # local | distributed
    sample_rate: Optional[float] = None  # distributed: public per-unit Poisson rate q (null: 0.05)
    min_survivors: Optional[int] = None  # distributed: merchants whose shares must reach the sum (null: all sampled)
    colluders: int = 0  # distributed: merchants that may pool their shares' noise knowledge with the coordinator
    rounding_overhead: float = 0.01  # distributed: sensitivity inflation allowed for integer rounding
    # Client-level central DP (Flower's DP strategy wrappers): unit = one merchant's whole update.
    central: str = "none"  # none | fixed | adaptive
    central_noise_multiplier: float = 1.0  # central: noise std / clipping norm of each round's release
    central_clipping_norm: float = 1.0  # central: L2 bound on each merchant's update (adaptive: the initial one)
    central_target_quantile: float = 0.5  # adaptive: the quantile of update norms the bound tracks
    central_clip_norm_lr: float = 0.2  # adaptive: learning rate of the bound's geometric update
    central_epsilon: float = 30.0  # central: client-level budget; the run stops before exceeding it
    central_delta: float = 1e-5  # central: client-level delta, below 1/federation.num_stores
    # Secure aggregation (Flower SecAgg+): the coordinator sees only the sum of updates.
    secure_aggregation: bool = False
    secagg_num_shares: int = 3  # shares each merchant's secret key is split into (>= 3)
    secagg_reconstruction_threshold: int = 2  # shares needed to unmask a merchant that dropped out
    secagg_clipping_range: float = 8.0  # update values are clipped to +-this before quantization
    secagg_quantization_range: int = 4194304  # integer levels per value; x stores_per_round below 2**32
    secagg_max_weight: float = 1000.0  # cap on a merchant's weight (its num-examples)
    secagg_timeout_s: Optional[float] = None  # seconds to wait for each stage's replies (null: no limit)


# --- strategy -------------------------------------------------------------------------------------
@dataclass
class FedAvgConfig:
    name: str = "fedavg"  # the option's name: set by strategy=fedavg, not to be overridden


@dataclass
class FedAdamConfig:
    name: str = "fedadam"  # the option's name: set by strategy=fedadam, not to be overridden
    eta: float = 0.01  # server-side learning rate
    eta_l: float = 0.01  # Flower's client-side learning rate: only logged (merchants use task.lr)
    beta_1: float = 0.9  # first-moment (momentum) decay
    beta_2: float = 0.99  # second-moment decay
    tau: float = 0.001  # added to the root of the second moment (degree of adaptivity)


@dataclass
class FedProxConfig:
    name: str = "fedprox"  # the option's name: set by strategy=fedprox, not to be overridden
    proximal_mu: float = 0.1  # weight of the proximal term pulling local training towards the global model


@dataclass
class FedMedianConfig:
    """Coordinate-wise median of the updates (Flower's FedMedian): robust to a minority of outliers."""

    name: str = "fedmedian"  # the option's name: set by strategy=fedmedian, not to be overridden


@dataclass
class FedTrimmedAvgConfig:
    """Coordinate-wise mean after dropping the ``beta`` share of largest and smallest values (Flower)."""

    name: str = "fedtrimmedavg"  # the option's name: set by strategy=fedtrimmedavg, not to be overridden
    beta: float = 0.2  # share trimmed at each end, in [0, 0.5)


StrategyConfig = FedAvgConfig | FedAdamConfig | FedProxConfig | FedMedianConfig | FedTrimmedAvgConfig


# --- federation -----------------------------------------------------------------------------------
@dataclass
class FederationConfig:
    num_stores: int = 100  # merchants (virtual stores in simulation; connected merchants in deployment)
    stores_per_round: int = 10  # merchants sampled to train in each round
    eval_stores_per_round: Optional[int] = None  # null = stores_per_round
    rounds: int = 5  # federated rounds
    client_cpus: int = 1  # per virtual client; 1 is best on small machines
    client_gpus: float = 0.0  # fraction of a GPU per virtual client
    # simulation: an existing Ray cluster to run the virtual merchants on (its head's host:port, as
    # `ray start --head` prints it, or auto); null: a private local Ray started for the run
    ray_address: Optional[str] = None
    # simulation: before round 1 every Ray actor imports the merchant stack and builds the public catalog
    # and model (one warm-up message each, timed on its own), so that round 1 costs what a later round does
    warm_up: bool = True
    # the coordinator rejects an update whose L2 distance to the global model exceeds this (null: no bound;
    # not checkable under secure aggregation, where the coordinator sees only the sum)
    max_update_norm: Optional[float] = None
    # simulation only: each sampled merchant's train call fails with this probability (fault injection;
    # seeded by run, round and merchant, so a run is reproducible); refused for storefed server
    failure_rate: float = 0.0
    # simulation only: how an injected failure shows: error (the call raises) | hang (no reply before
    # round_timeout_s; the merchant answers, too late, with an error)
    failure_mode: str = "error"
    round_timeout_s: float = 3600.0  # seconds the coordinator waits for a round's replies; the rest count as failed
    # sample ceil(stores_per_round x overselect) merchants per round, so that with dropouts about
    # stores_per_round still reply (e.g. 1.43 for 30% failing); every reply that comes back is aggregated
    overselect: float = 1.0
    # how each merchant's update travels, compressed after the DP noise (post-processing):
    # float32 | float16 (2x smaller) | int8 (stochastic rounding of the difference to the global model, ~4x)
    update_encoding: str = "float32"

    def sampled_per_round(self) -> int:
        """Merchants asked to train each round (over-selected for dropouts)."""
        return min(self.num_stores, math.ceil(self.stores_per_round * self.overselect - 1e-9))

    def evaluated_per_round(self) -> int:
        """Merchants that evaluate the global model each round."""
        return self.stores_per_round if self.eval_stores_per_round is None else self.eval_stores_per_round


# --- data -----------------------------------------------------------------------------------------
@dataclass
class GeneratorConfig:
    """Virtual stores (storefed.data.virtual_stores), generated on demand, deterministic per seed."""

    num_items: int = 1000  # catalog size, shared by every store
    num_categories: int = 20  # item categories; each customer's taste lies near one of them
    latent_dim: int = 16  # dimension of the latent item and taste vectors
    popularity_exponent: float = 0.8  # log popularity = -exponent * log(popularity rank)
    taste_strength: float = 6.0  # weight of taste affinity against log popularity in choices
    mean_customers: float = 150.0  # customers per store: log-normal with this median
    sigma_customers: float = 0.7  # log-normal sigma of customers per store
    min_customers: int = 12  # customers per store are clipped to at least this
    max_customers: int = 2000  # customers per store are clipped to at most this
    category_alpha: float = 0.5  # Dirichlet concentration of a store's category mix
    mean_interactions: float = 10.0  # mean items per customer (2 + Poisson)
    review_probability: float = 0.2  # chance that an interaction gets a review
    review_noise: float = 0.1  # chance that a review's words carry the opposite sentiment
    start_time: int = 1_600_000_000  # Unix time of the first interactions (a year follows)


@dataclass
class VirtualDataConfig:
    source: str = "virtual"  # the option's name: set by data=virtual, not to be overridden
    # the virtual-store generator (seeded by the run's seed)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class ImportedDataConfig:
    """A public data set (Amazon JSON lines, MovieLens u.data) partitioned by customer into merchants."""

    source: str = "amazon"  # amazon | movielens
    path: str = MISSING  # the data set file (Amazon JSON lines, plain or gzip; MovieLens u.data)
    num_merchants: int = 10  # merchants the customers are split into
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.3  # dirichlet concentration
    label: str = "category"  # dirichlet label: category | item


@dataclass
class FilesDataConfig:
    """Deployment: merchants read their own directories; the coordinator publishes this catalog."""

    source: str = "files"  # the option's name: set by data=files, not to be overridden
    catalog: str = "catalog.csv"  # the shared catalog CSV the coordinator publishes


DataConfig = VirtualDataConfig | ImportedDataConfig | FilesDataConfig


# --- storefed server ------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    certs_dir: str = "certs"  # from `storefed certs`: ca.crt, server.pem, server.key
    authorized_dir: str = "certs/merchants"  # every *.pub here is registered as an authorized merchant
    fleet_address: str = "0.0.0.0:9092"  # public: merchants connect here (gRPC + TLS)
    control_host: str = "127.0.0.1"  # control API + ServerApp runtime: never public
    control_port: int = 9093  # control API port on control_host
    insecure: bool = False  # true = no TLS, no node auth (local debugging only)
    start_timeout_s: float = 60.0  # seconds to wait for the SuperLink's ports to open
    run_timeout_s: float = 3600.0  # seconds the federated run may take before the server gives up


# --- root configs, one per command ----------------------------------------------------------------
def _defaults(**choices: str) -> list[Any]:
    return [{group: option} for group, option in choices.items()] + ["_self_"]


@dataclass
class RunConfig:
    """`storefed simulate`: one federated run of one task."""

    defaults: List[Any] = field(default_factory=lambda: _defaults(
        task="recommender", privacy="dp", strategy="fedavg", federation="local", data="virtual"))
    task: Any = MISSING  # what is learned: task=recommender | review
    privacy: PrivacyConfig = MISSING  # record-level DP at the merchants: privacy=dp | none
    strategy: Any = MISSING  # how the coordinator aggregates the updates
    federation: FederationConfig = MISSING  # merchants, rounds and sampling
    data: Any = MISSING  # where the merchants' data comes from
    seed: int = 0  # model initialisation and virtual stores (never DP noise or sampling)
    device: str = "auto"  # auto | cpu | cuda[:N]
    run_dir: Optional[str] = None  # default: ./runs/<time>-<task>
    # continue the run in run_dir from its last complete round (its checkpoint/); false: run_dir must be new
    resume: bool = False


@dataclass
class ServerRunConfig(RunConfig):
    """`storefed server`: the coordinator's SuperLink and one federated run over real merchants."""

    defaults: List[Any] = field(default_factory=lambda: _defaults(
        task="recommender", privacy="dp", strategy="fedavg", federation="deployment", data="files"))
    # the coordinator's SuperLink: addresses, TLS material, timeouts
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class EvaluateSettings:
    # one grid cell per merchant count K (sets federation.num_stores and data.num_merchants)
    num_merchants: List[int] = field(default_factory=lambda: [10, 50])
    # one cell per scheme: iid | dirichlet (data=virtual: generated stores)
    partitions: List[str] = field(default_factory=lambda: ["iid", "dirichlet"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # one cell per seed (sets seed)
    epsilons: List[float] = field(default_factory=lambda: [1.0, 3.0, 8.0])  # privacy.epsilon of each run of a DP method
    methods: Optional[List[str]] = None  # null = every method of the task
    rounds: int = 2  # federated rounds per cell (sets federation.rounds)
    stores_per_round: Optional[int] = None  # null = every merchant in every round
    threads: int = 1  # torch threads while the grid runs
    tfidf_max_features: int = 20000  # task=review: vocabulary of the tfidf_logreg baseline


@dataclass
class EvaluateConfig(RunConfig):
    """`storefed evaluate`: the privacy-utility grid on real data."""

    defaults: List[Any] = field(default_factory=lambda: _defaults(
        task="recommender", privacy="dp", strategy="fedavg", federation="local", data="amazon"))
    # the grid: merchant counts x partitions x seeds, methods, epsilons
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)


@dataclass
class AuditSettings:
    stores: int = 4  # virtual stores whose customers are the merchant's real DP units
    canaries: int = 1000  # m: canary customers, each included with probability 1/2
    canary_length: int = 5  # distinct items in each canary's random history
    guesses: Optional[List[int]] = None  # null = 5%, 10%, 20%, 50%, 100% of the canaries
    confidence: float = 0.95  # confidence of the empirical lower bound on epsilon
    delta: Optional[float] = None  # null = privacy.delta (1e-5 under privacy=none)
    epochs: Optional[int] = None  # null = task.epochs
    seed: int = 0  # the canaries' histories and inclusion coins


@dataclass
class AuditConfig:
    """`storefed audit`: one-run canary audit of a merchant's local DP-SGD."""

    defaults: List[Any] = field(default_factory=lambda: _defaults(task="recommender", privacy="dp", data="virtual"))
    task: Any = MISSING  # must be task=recommender (canaries are customers)
    privacy: PrivacyConfig = MISSING  # the audited DP-SGD settings (privacy=none: a non-private reference)
    data: Any = MISSING  # must be data=virtual
    seed: int = 0  # model initialisation and virtual stores
    device: str = "auto"  # auto | cpu | cuda[:N]
    run_dir: Optional[str] = None  # default: ./runs/<time>-audit-<dp|none>
    audit: AuditSettings = field(default_factory=AuditSettings)  # the canary audit


@dataclass
class MerchantConfig:
    """`storefed merchant`: one merchant's agent (SuperNode)."""

    data_dir: str = MISSING  # the merchant's data directory (schema v1)
    catalog: Optional[str] = None  # default: <data_dir>/catalog.csv
    ledger_dir: str = "ledger"  # the privacy ledger: keep it, back it up, never delete it
    superlink: str = "127.0.0.1:9092"  # the coordinator's fleet address, host:port
    ca_cert: Optional[str] = "certs/ca.crt"  # the coordinator's CA certificate (TLS trust)
    private_key: Optional[str] = None  # this merchant's node key (certs/merchants/<name>)
    port: int = 9094  # local ClientApp runtime port (one per merchant on a host)
    insecure: bool = False  # true = no TLS, no node key (local debugging only)
    epsilon_budget: Optional[float] = None  # the merchant's own budget per task
    # the merchant's own per-customer budget across all tasks (overrides privacy.person_epsilon)
    person_epsilon_budget: Optional[float] = None
    delta: Optional[float] = None  # the merchant's own delta (overrides privacy.delta)
    max_wait_time_s: Optional[float] = None  # stop retrying a failed connection after this (null: never)


@dataclass
class MerchantStatusConfig:
    """`storefed merchant status`: what a merchant's ledger holds."""

    ledger_dir: str = "ledger"  # the merchant's privacy ledger directory


@dataclass
class CertsConfig:
    """`storefed certs`: TLS material for the coordinator and node keys for merchants."""

    out_dir: str = "certs"  # where ca.*, server.* and merchants/ are written
    merchants: List[str] = field(default_factory=list)  # one node key pair per name: merchants/<name>(.pub)
    dns: List[str] = field(default_factory=lambda: ["localhost"])  # DNS names in the coordinator's TLS certificate
    ips: List[str] = field(default_factory=lambda: ["127.0.0.1"])  # IP addresses in the coordinator's TLS certificate
    days: int = 365  # validity of the CA and server certificates
    organization: str = "StoreFed"  # organization name in the certificates
    force: bool = False  # true = replace existing material in out_dir


@dataclass
class ImportConfig:
    """`storefed import`: a public data set (or virtual stores) -> merchant directories."""

    defaults: List[Any] = field(default_factory=lambda: _defaults(data="amazon"))
    data: Any = MISSING  # the data set: data=amazon | movielens
    seed: int = 0  # the split of customers into merchants
    out_dir: str = MISSING  # a new directory: one merchant directory each + catalog.csv
