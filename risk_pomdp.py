"""Beta Vector Value Iteration (BVVI): risk-sensitive RL in a tabular POMDP with hindsight observation.

Paper: T. Zhang, Y. Chen, L. Huang, "Provably Efficient Partially Observable Risk-Sensitive Reinforcement
Learning with Hindsight Observation", ICML 2024 (arXiv:2402.18149), Algorithm 1 (BVVI). The authors' code is
github.com/Tonghe-Zhang/BVVI (torch, Python loops over histories); this file is a separate numpy
implementation (where the two differ, and why, is in the README).

Setting. Episodic POMDP with hidden states s in [S], observations o in [O], actions a in [A],
horizon H, K episodes; initial law mu_1(s), transitions T_h(s'|s,a), emissions O_h(o|s), rewards
r_h(s,a) in [0,1]. The agent acts on its history f_h = (o_1, a_1, ..., a_{h-1}, o_h) in F_h; after each
episode the hidden states s_1..s_{H+1} are revealed (hindsight observation). Objective, entropic risk:
    J_gamma(pi) = (1/gamma) log E_pi[exp(gamma * sum_h r_h(s_h, a_h))],   gamma != 0
(gamma < 0 risk averse, gamma > 0 risk seeking, gamma -> 0 gives E_pi[sum_h r_h]).

Change of measure. Under a reference measure P' the observations are i.i.d. uniform (1/O), so
the likelihood ratio of o_h is O * O_h(o_h|s_h). The risk belief sigma_{h,f_h} in R^S carries that ratio
and the exponentiated past rewards:
    sigma_{1,o_1}(s)          = O * O_1(o_1|s) mu_1(s)
    sigma_{h+1,(f_h,a,o')}(s') = O * O_{h+1}(o'|s') sum_s T_h(s'|s,a) exp(gamma r_h(s,a)) sigma_{h,f_h}(s).
Beta vectors (the risk analogue of alpha vectors) run backwards for a policy pi:
    beta_{H+1} = 1,
    beta_{h,f_h}(s) = sum_a pi_h(a|f_h) exp(gamma r_h(s,a)) sum_{s'} T_h(s'|s,a)
                      sum_{o'} O_{h+1}(o'|s') beta_{h+1,(f_h,a,o')}(s'),
and for every h, E_pi[exp(gamma R)] = E'_pi[<sigma_{h,f_h}, beta_{h,f_h}>]; at h = 1 this is
    J_gamma(pi) = (1/gamma) log( (1/O) sum_{o_1} <sigma_{1,o_1}, beta_{1,o_1}> ).
The objective is a sum over histories of terms that each depend only on the continuation from that
history, so exact planning picks, backwards, at every f_h (Algorithm 1, line 19)
    Q_h(f_h, a) = (1/gamma) log( (1/O) sum_{o'} <sigma_{h+1,(f_h,a,o')}, beta_{h+1,(f_h,a,o')}> )
               = (1/gamma) log <sigma_{h,f_h}, beta^a_{h,f_h}>,
    pi_h(f_h) = argmax_a Q_h(f_h, a)      (argmax_a sign(gamma) <sigma, beta^a>),
where beta^a is the backup above with pi_h = a. The second form is the same number (substitute the
sigma recursion) and avoids building F_{H+1}.

BVVI, episode k (Algorithm 1): with hindsight counts N_h^k(s,a), N_h^k(s), form P-hat = (mu-hat, T-hat,
O-hat) by empirical frequencies (uniform where a count is 0), propagate sigma-hat with P-hat, then
    iota = log(K H S O A / delta)
    t_h^k(s,a) = min(1, 3 sqrt(S H iota / (N_h^k(s,a) v 1)))       (transition residue)
    o_h^k(s)   = min(1, 3 sqrt(O H iota / (N_h^k(s) v 1)))         (emission residue)
    b_h^k(s,a) = |exp(gamma (H-h+1)) - 1| * min(1, t_h^k(s,a) + sum_{s'} T-hat_h(s'|s,a) o_{h+1}^k(s'))
    beta-hat^a_{h,f_h}(s) = clip( e^{gamma r_h(s,a)} [T-hat_h O-hat_{h+1} beta-hat_{h+1,(f_h,a,.)}](s)
                                  + sign(gamma) b_h^k(s,a),  exp(gamma^- (H-h+1)), exp(gamma^+ (H-h+1)) )
    Q-hat_h(f_h, a) = (1/gamma) log <sigma-hat_{h,f_h}, beta-hat^a_{h,f_h}>,  pi^k_h(f_h) = argmax_a Q-hat_h,
    beta-hat_{h,f_h} = beta-hat^{pi^k_h(f_h)}_{h,f_h},
with gamma^+ = max(gamma,0), gamma^- = min(gamma,0) (optimism: a larger E[e^{gamma R}] is better when
gamma > 0, a smaller one when gamma < 0). Play pi^k, observe s_{1:H+1} in hindsight, update counts.
Regret bound (main theorem, as stated in the abstract):
    Regret(K) = sum_k J(pi*) - J(pi^k) = O~( (e^{|gamma| H} - 1)/(|gamma| H) * H^2 * sqrt(K H S^2 O A) ).

Provenance of details, honestly: the name, objective, change of measure and bound are from the paper's
abstract/summary. The residue constants (3, S H iota, O H iota), the |e^{gamma(H-h+1)} - 1| factor, the
sign(gamma) bonus and the clipping range were read from the authors' BVVI.py, which cites the paper's
Algorithm 1 line numbers; I could not read the PDF body to confirm them. Derived by me: the
identity behind the cheaper form of Q_h; that Q-hat_h includes the step-h bonus b_h(.,a) of each
candidate a (the script's line-19 form (1/O) sum_o' <sigma_{h+1}, beta_{h+1}> adds b_h only after a is
chosen; including it is what makes Q-hat_h >= Q*_h for every a, as optimism needs, and with b = 0 the two
coincide); sigma_1 carrying O*O_1(o_1|s) (that script uses mu-hat alone);
o_{H+1} = 0 since beta_{H+1} = 1 makes the last emission irrelevant; --bonus-scale c multiplying b (c = 1
is the paper). Risk-neutral baseline (--learner neutral): the gamma -> 0 limit of the same algorithm in
value units: alpha vectors alpha_h = r_h(s,a) + T-hat O-hat alpha_{h+1}, bonus (H-h+1) * min(1, ...),
clip [0, H-h+1]; its policies are scored by the same entropic J_gamma.

Exact planning enumerates all O^H A^H (history, action) pairs per episode, exponential in H; the script
refuses sizes above --max-pairs. Every array may carry leading batch axes (one row per seed): the seeds of a
run are learned together, one vectorised planner call per episode. Tiger (--env tiger): S=2 (tiger
left/right), A=3 (listen, open left, open right), O=2 (hear left/right, correct w.p. 0.85); rewards listen -1,
right door +10, tiger -100, mapped affinely to [0,1]; opening re-places the tiger uniformly. The paper's
emissions depend on the state only, so unlike the classic Tiger an observation after opening is informative
about the new state.

Instances where risk decides (H = 2, O = 2, A = 2; returns in [0, 2]; exact gaps in the README):
- gamble (S=5: good, bad market; won, lost, safe): a weak forecast o_1 of the market (right w.p. 0.55, prior
  1/2). a=0 (safe) pays 0.46 now and 0.46 next step; a=1 (gamble) pays 1 + 1 in a good market and 0 + 0 in a
  bad one. Risk neutral: gamble on a good forecast only; gamma = -2: never gamble; gamma = +2: always gamble.
- scout (S=4: tiger left/right unscouted, left/right scouted): a hint o_h, right w.p. 0.65, at each step. Step
  1: a=0 scouts (pays 0; the next observation then shows the side exactly), a=1 rushes (pays 0.45); step 2:
  open a door (right door 1, wrong 0). Scouting guarantees 1, rushing is 0.45 + Bernoulli(~0.65): the neutral
  and the risk-seeking optimum rush, the risk-averse one (gamma = -2) scouts: information pays only for gamma
  < 0.
- public: the instance shipped with the authors' code (github.com/Tonghe-Zhang/BVVI, main.py/utils.py
  manual_initialization, stochastic transitions, perturbed emissions, 0/1 rewards): S=3, O=3, A=2, s_1 = 0,
  T(.|s) the same for both actions, s -> s+1 mod 3 w.p. 0.95/0.94/0.89, r(s,a) = 1 iff a = s mod 2.
"""

import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, NoReturn

import numpy as np
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the first run (environment instance and episodes)"""
    num_seeds: int = 1
    """runs with seeds seed, seed+1, ..., learned together; each seed draws its own random POMDP"""
    env: Literal["random", "tiger", "gamble", "scout", "public"] = "random"
    """random: Dirichlet(1) transitions/emissions, U[0,1] rewards; tiger, gamble, scout, public: the fixed
    instances of the module docstring (gamble and scout have H = 2 whatever --horizon says)"""
    gamma: float = -1.0
    """entropic risk parameter of the objective (< 0 risk averse, > 0 risk seeking)"""
    learner: Literal["bvvi", "neutral"] = "bvvi"
    """bvvi: the paper's algorithm at --gamma; neutral: risk-neutral optimistic learner, scored at --gamma"""
    episodes: int = 2000
    """number of episodes K"""
    horizon: int = 3
    """horizon H (random, tiger, public)"""
    num_states: int = 3
    """number of hidden states S (random env)"""
    num_obs: int = 2
    """number of observations O (random env)"""
    num_actions: int = 2
    """number of actions A (random env)"""
    bonus_scale: float = 1.0
    """multiplier c on the paper's bonus b_h^k (1 = the paper's constants)"""
    delta: float = 0.1
    """confidence level delta in iota = log(K H S O A / delta)"""
    max_pairs: int = 1_000_000
    """refuse to plan when O^H A^H (history, action) pairs exceed this"""
    print_every: int = 500
    """print cumulative regret every this many episodes"""
    plot: bool = False
    """write a cumulative-regret-vs-K PNG next to the CSV"""
    out_dir: str = "runs"
    """where the per-episode regret CSV (and PNG) go"""


class Pomdp(NamedTuple):
    mu: np.ndarray  # (..., S) initial law mu_1
    T: np.ndarray  # (..., H, S, A, S) T_h(s'|s,a)
    O: np.ndarray  # (..., H, S, O) O_h(o|s)
    r: np.ndarray  # (..., H, S, A) r_h(s,a) in [0,1]


def make_random_pomdp(nS: int, nO: int, nA: int, H: int, rng: np.random.Generator) -> Pomdp:
    return Pomdp(
        mu=rng.dirichlet(np.ones(nS)),
        T=rng.dirichlet(np.ones(nS), size=(H, nS, nA)),
        O=rng.dirichlet(np.ones(nO), size=(H, nS)),
        r=rng.uniform(size=(H, nS, nA)),
    )


def make_tiger(H: int, accuracy: float = 0.85) -> Pomdp:
    listen, right_door, tiger = -1.0, 10.0, -100.0
    scale = lambda x: (x - tiger) / (right_door - tiger)  # noqa: E731
    T = np.zeros((2, 3, 2))
    T[:, 0] = np.eye(2)  # listening keeps the tiger where it is
    T[:, 1:] = 0.5  # opening a door re-places it
    O = np.array([[accuracy, 1 - accuracy], [1 - accuracy, accuracy]])
    r = np.array([[listen, tiger, right_door], [listen, right_door, tiger]])  # s=0: tiger left
    return Pomdp(
        mu=np.full(2, 0.5),
        T=np.repeat(T[None], H, 0),
        O=np.repeat(O[None], H, 0),
        r=np.repeat(scale(r)[None], H, 0),
    )


def make_gamble(accuracy: float = 0.55, safe: float = 0.46) -> Pomdp:
    good, bad, won, lost, safe_path = range(5)
    T = np.zeros((2, 5, 2, 5))
    T[:, :, :, safe_path] = 1.0  # a=0 at step 1 takes the safe path
    T[0, good, 1], T[0, bad, 1] = np.eye(5)[won], np.eye(5)[lost]
    T[:, won:] = np.eye(5)[won:, None, :]  # the outcome stays
    O = np.full((2, 5, 2), 0.5)  # step 2 observations carry nothing
    O[0, good], O[0, bad] = [accuracy, 1 - accuracy], [1 - accuracy, accuracy]
    r = np.zeros((2, 5, 2))
    r[0, :, 0], r[0, good, 1] = safe, 1.0
    r[1, won], r[1, safe_path] = 1.0, safe
    return Pomdp(mu=np.array([0.5, 0.5, 0, 0, 0]), T=T, O=O, r=r)


def make_scout(accuracy: float = 0.65, rush: float = 0.45) -> Pomdp:
    T = np.zeros((2, 4, 2, 4))
    T[0, :2, 0, 2:] = np.eye(2)  # scouting: left -> scouted left, right -> scouted right
    T[0, :2, 1, :2] = np.eye(2)  # rushing keeps the side unscouted
    T[0, 2:], T[1] = np.eye(4)[2:, None, :], np.eye(4)[:, None, :]  # then nothing moves
    hint = np.array([[accuracy, 1 - accuracy], [1 - accuracy, accuracy]])
    O = np.repeat(np.concatenate([hint, np.eye(2)])[None], 2, 0)
    r = np.zeros((2, 4, 2))
    r[0, :2, 1] = rush
    r[1, [0, 2], 0] = r[1, [1, 3], 1] = 1.0  # a = the side of the right door
    return Pomdp(mu=np.array([0.5, 0.5, 0, 0]), T=T, O=O, r=r)


def make_public(H: int) -> Pomdp:
    T = np.array([[0.03, 0.95, 0.02], [0.04, 0.02, 0.94], [0.89, 0.10, 0.01]])  # T(s'|s), rows s
    O = np.array([[0.83, 0.05, 0.02], [0.08, 0.79, 0.09], [0.09, 0.06, 0.89]])
    O = O / O.sum(1, keepdims=True)  # the repository normalises these rows the same way
    r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    return Pomdp(
        mu=np.array([1.0, 0, 0]),
        T=np.repeat(np.repeat(T[:, None], 2, 1)[None], H, 0),
        O=np.repeat(O[None], H, 0),
        r=np.repeat(r[None], H, 0),
    )


def make_env(args: "Args", seed: int) -> Pomdp:
    """The true POMDP of one run (only --env random depends on the seed)."""
    if args.env == "random":
        rng = np.random.default_rng(seed)
        return make_random_pomdp(args.num_states, args.num_obs, args.num_actions, args.horizon, rng)
    if args.env == "tiger":
        return make_tiger(args.horizon)
    if args.env == "public":
        return make_public(args.horizon)
    return make_gamble() if args.env == "gamble" else make_scout()


def sign(gamma: float) -> float:
    """Direction of optimisation for <sigma, beta>; gamma = 0 means alpha vectors (maximise)."""
    return -1.0 if gamma < 0 else 1.0


def risk_beliefs(model: Pomdp, gamma: float) -> list[np.ndarray]:
    """sigma_h for h = 1..H, each (..., |F_h|, S); history index i_{h+1} = (i_h * A + a) * O + o'."""
    H, nS, nA = model.r.shape[-3:]
    nO = model.O.shape[-1]
    sigma = [nO * np.swapaxes(model.O[..., 0, :, :] * model.mu[..., :, None], -1, -2)]  # (..., O, S)
    for h in range(H - 1):
        # m[i,a,s'] = sum_s sigma(i,s) exp(gamma r_h(s,a)) T_h(s'|s,a)
        m = np.einsum(
            "...is,...sa,...sat->...iat",
            sigma[h],
            np.exp(gamma * model.r[..., h, :, :]),
            model.T[..., h, :, :, :],
        )
        emit = np.swapaxes(model.O[..., h + 1, :, :], -1, -2)[..., None, None, :, :]  # (..., 1, 1, o', s')
        nxt = nO * m[..., :, :, None, :] * emit
        sigma.append(nxt.reshape(*nxt.shape[:-4], -1, nS))
    return sigma


def backup(beta_next: np.ndarray | None, model: Pomdp, h: int, gamma: float) -> np.ndarray:
    """beta^a_{h,f}(s) for every history f at step h and action a -> (..., |F_h|, A, S), no bonus, no clip."""
    H, nS, nA = model.r.shape[-3:]
    nO = model.O.shape[-1]
    if beta_next is None:  # h = H: beta_{H+1} = 1 (alpha_{H+1} = 0)
        cont = np.full((nO * (nO * nA) ** h, nA, nS), 0.0 if gamma == 0 else 1.0)
    else:
        # cont[i,a,s] = sum_{s'} T_h(s'|s,a) sum_{o'} O_{h+1}(o'|s') beta_{h+1,(i,a,o')}(s')
        beta_next = beta_next.reshape(*beta_next.shape[:-2], -1, nA, nO, nS)
        emitted = np.einsum("...to,...iaot->...iat", model.O[..., h + 1, :, :], beta_next)
        cont = np.einsum("...sat,...iat->...ias", model.T[..., h, :, :, :], emitted)
    r = np.swapaxes(model.r[..., h, :, :], -1, -2)[..., None, :, :]  # (..., 1, A, S)
    return r + cont if gamma == 0 else np.exp(gamma * r) * cont


def value_from_level1(sigma1: np.ndarray, beta1: np.ndarray, gamma: float) -> np.ndarray:
    """J = (1/gamma) log E'_{o_1}<sigma_1, beta_1> per batch row; for gamma = 0 the average is E[sum r]."""
    w = np.mean(np.sum(sigma1 * beta1, axis=-1), axis=-1)
    return w if gamma == 0 else np.log(w) / gamma


def evaluate(
    model: Pomdp, policy: list[np.ndarray], gamma: float, sigma1: np.ndarray | None = None
) -> np.ndarray:
    """Exact J_gamma(pi) of a history-dependent policy by the beta-vector recursion.

    policy[h] is (..., |F_h|) integer actions (deterministic) or (..., |F_h|, A) probabilities pi_h(a|f_h)."""
    H, nS, nA = model.r.shape[-3:]
    beta = None
    for h in reversed(range(H)):
        pi = np.eye(nA)[policy[h]] if np.issubdtype(policy[h].dtype, np.integer) else policy[h]
        beta = np.einsum("...ia,...ias->...is", pi, backup(beta, model, h, gamma))
    if sigma1 is None:
        sigma1 = risk_beliefs(model, gamma)[0]
    return value_from_level1(sigma1, beta, gamma)


def plan(
    model: Pomdp, gamma: float, bonus: np.ndarray | None = None, rng: np.random.Generator | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Optimistic beta-vector value iteration on `model` with bonus b (..., H, S, A); None = exact planning.

    Returns the greedy deterministic policy (actions per history, per step) and its optimistic value.
    With rng, ties are broken uniformly at random: early on every optimistic beta sits at the clip bound,
    and a fixed tie-break would keep playing action 0 until its bonus shrinks."""
    H, nS, nA = model.r.shape[-3:]
    sigma = risk_beliefs(model, gamma)
    policy, beta = [None] * H, None
    for h in reversed(range(H)):
        beta_a = backup(beta, model, h, gamma)  # (..., i, a, s)
        if bonus is not None:
            n = H - h  # remaining steps H - h + 1 in the paper's 1-based h
            lo, hi = (0.0, n) if gamma == 0 else (np.exp(min(gamma, 0) * n), np.exp(max(gamma, 0) * n))
            b = np.swapaxes(bonus[..., h, :, :], -1, -2)[..., None, :, :]  # (..., 1, A, S)
            beta_a = np.clip(beta_a + sign(gamma) * b, lo, hi)
        q = sign(gamma) * np.einsum("...is,...ias->...ia", sigma[h], beta_a)  # monotone in Q_h(f_h, a)
        if rng is not None:
            q = np.where(q >= q.max(-1, keepdims=True) - 1e-12, rng.random(q.shape), -1.0)
        policy[h] = np.argmax(q, axis=-1)
        beta_a = np.broadcast_to(beta_a, q.shape + (nS,))
        beta = np.take_along_axis(beta_a, policy[h][..., None, None], axis=-2)[..., 0, :]
    return policy, value_from_level1(sigma[0], beta, gamma)


def bonus(
    N_sa: np.ndarray, N_s: np.ndarray, T_hat: np.ndarray, nO: int, gamma: float, iota: float
) -> np.ndarray:
    """b_h^k(s,a) of Algorithm 1 (before --bonus-scale): N_sa (...,H,S,A) = N_h(s,a), N_s (...,H,S) = N_h(s).

    Infinite counts (the exact model) give b = 0; gamma = 0 gives the risk-neutral (H-h+1) factor."""
    H, nS, nA = N_sa.shape[-3:]
    t = np.minimum(1.0, 3 * np.sqrt(nS * H * iota / np.maximum(N_sa, 1)))
    o = np.minimum(1.0, 3 * np.sqrt(nO * H * iota / np.maximum(N_s, 1)))
    o_next = np.concatenate(
        [o[..., 1:, :], np.zeros_like(o[..., :1, :])], axis=-2
    )  # o_{H+1} = 0: beta_{H+1} = 1
    residue = np.minimum(1.0, t + np.einsum("...hsat,...ht->...hsa", T_hat, o_next))
    n = H - np.arange(H)  # H - h + 1 with 1-based h
    factor = n if gamma == 0 else np.abs(np.expm1(gamma * n))
    return factor[:, None, None] * residue


def estimate(N_mu: np.ndarray, N_T: np.ndarray, N_O: np.ndarray) -> Pomdp:
    """Empirical mu-hat, T-hat, O-hat from hindsight counts (uniform where nothing was seen); r is known."""

    def normalise(N):
        tot = N.sum(-1, keepdims=True)
        return np.where(tot > 0, N / np.maximum(tot, 1), 1.0 / N.shape[-1])

    return Pomdp(mu=normalise(N_mu), T=normalise(N_T), O=normalise(N_O), r=None)


def draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One index per row of probabilities p (B, n), by inverse CDF."""
    cdf = np.cumsum(p, axis=-1)
    return np.minimum((rng.random(len(p))[:, None] >= cdf).sum(-1), p.shape[-1] - 1)


def sample_episodes(model: Pomdp, policy: list[np.ndarray], rng: np.random.Generator):
    """One episode per row of a batched model (B, ...) acting on observation histories with policy[h]
    (B, |F_h|); returns the hindsight states s_1..s_{H+1} (B, H+1), observations o and actions a (B, H)."""
    B, H, nS, nA = model.r.shape
    nO = model.O.shape[-1]
    rows = np.arange(B)
    s, o, a = np.empty((B, H + 1), int), np.empty((B, H), int), np.empty((B, H), int)
    s[:, 0], i = draw(model.mu, rng), 0
    for h in range(H):
        o[:, h] = draw(model.O[rows, h, s[:, h]], rng)
        i = o[:, h] if h == 0 else (i * nA + a[:, h - 1]) * nO + o[:, h]
        a[:, h] = policy[h][rows, i]
        s[:, h + 1] = draw(model.T[rows, h, s[:, h], a[:, h]], rng)
    return s, o, a


def update_counts(N_mu: np.ndarray, N_T: np.ndarray, N_O: np.ndarray, s, o, a) -> None:
    """Hindsight observation: each row's hidden states s_1..s_{H+1} are revealed and counted."""
    B, H = a.shape
    b, h = np.arange(B)[:, None], np.arange(H)[None]
    N_mu[b[:, 0], s[:, 0]] += 1
    N_T[b, h, s[:, :-1], a, s[:, 1:]] += 1  # (b, h) pairs are distinct, so += counts every one
    N_O[b, h, s[:, :-1], o] += 1


def run(args: Args, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """K episodes of the learner, one row per seed, all rows planned in one batched call per episode.

    Returns the per-episode regret J(pi*) - J(pi^k) (seeds, K) and J(pi*) (seeds,)."""
    true = Pomdp(*map(np.stack, zip(*[make_env(args, seed) for seed in seeds], strict=True)))
    B, H, nS, nA = true.r.shape
    nO = true.O.shape[-1]
    rng = np.random.default_rng(seeds)
    K, gamma = args.episodes, args.gamma
    gamma_plan = gamma if args.learner == "bvvi" else 0.0
    sigma1 = risk_beliefs(true, gamma)[0]
    J_star = plan(true, gamma)[1]
    iota = np.log(K * H * nS * nO * nA / args.delta)
    N_mu, N_T, N_O = np.zeros((B, nS)), np.zeros((B, H, nS, nA, nS)), np.zeros((B, H, nS, nO))
    regret, J, last, t0 = np.empty((B, K)), np.zeros(B), None, time.time()
    for k in range(K):
        model = estimate(N_mu, N_T, N_O)._replace(r=true.r)
        b = args.bonus_scale * bonus(N_T.sum(-1), N_O.sum(-1), model.T, nO, gamma_plan, iota)
        policy, _ = plan(model, gamma_plan, b, rng)
        # pi^k often repeats; exact J is recomputed only for the rows whose policy changed
        new = np.ones(B, bool)
        if last is not None:
            new = np.logical_or.reduce([(p != q).any(-1) for p, q in zip(policy, last, strict=True)])
        if new.any():
            J[new] = evaluate(Pomdp(*(x[new] for x in true)), [p[new] for p in policy], gamma, sigma1[new])
        regret[:, k], last = J_star - J, policy
        update_counts(N_mu, N_T, N_O, *sample_episodes(true, policy, rng))
        if args.print_every and ((k + 1) % args.print_every == 0 or k + 1 == K):
            cum = regret[:, : k + 1].sum(1)
            print(
                f"k={k + 1} cumulative_regret={cum.mean():.4f} +- {cum.std():.4f} "
                f"J(pi_k)={J.mean():.4f} J*={J_star.mean():.4f} "
                f"episodes/s={(k + 1) / (time.time() - t0):.0f} (x{B} seeds)",
                flush=True,
            )
    return regret, J_star


def loglog_slope(cum_regret: np.ndarray) -> float:
    """Slope of log R(K) vs log K over K in [K_max/10, K_max] (0.5 for sqrt(K) regret, 1 for linear)."""
    K = len(cum_regret)
    ks = np.unique(np.geomspace(max(1, K // 10), K, 30).astype(int))
    if K < 10 or cum_regret[ks[0] - 1] <= 0:
        return float("nan")
    return float(np.polyfit(np.log(ks), np.log(np.maximum(cum_regret[ks - 1], 1e-12)), 1)[0])


def fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 1, not a traceback."""
    raise SystemExit(f"error: {msg}")


def check_args(args: Args) -> str | None:
    """One line saying what is wrong with the arguments, or None."""
    sizes = {"--episodes": args.episodes, "--horizon": args.horizon, "--num-seeds": args.num_seeds}
    if args.env == "random":
        sizes |= {
            "--num-states": args.num_states,
            "--num-obs": args.num_obs,
            "--num-actions": args.num_actions,
        }
    for flag, v in sizes.items():
        if v < 1:
            return f"{flag} must be >= 1 (got {v})"
    nO, nA, H = {
        "random": (args.num_obs, args.num_actions, args.horizon),
        "tiger": (2, 3, args.horizon),
        "public": (3, 2, args.horizon),
    }.get(args.env, (2, 2, 2))
    if not np.isfinite(args.gamma) or abs(args.gamma) * H > 50:
        return (
            f"--gamma must be finite with |gamma|*H <= 50 so exp(gamma*H) is representable (got {args.gamma})"
        )
    if args.gamma == 0 and args.learner == "bvvi":
        return (
            "--gamma 0 is not an entropic risk (BVVI needs gamma != 0); use --learner neutral for gamma = 0"
        )
    if not 0 < args.delta < 1 or args.bonus_scale < 0:
        return f"need 0 < --delta < 1 and --bonus-scale >= 0 (got {args.delta}, {args.bonus_scale})"
    pairs = (nO * nA) ** H
    if pairs > args.max_pairs:
        return (
            f"exact planning enumerates O^H*A^H = {pairs} (history, action) pairs > --max-pairs "
            f"{args.max_pairs}; lower --horizon, --num-obs or --num-actions"
        )
    try:  # an unwritable --out-dir should fail now, not after the whole run
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        return f"--out-dir {args.out_dir!r} cannot be created ({e.strerror}); pass a writable directory"
    if not os.access(args.out_dir, os.W_OK):
        return f"--out-dir {args.out_dir!r} is not writable; pass a writable directory"
    return None


def main(args: Args) -> np.ndarray:
    error = check_args(args)
    if error:
        fail(error)
    run_name = f"{args.env}__{args.exp_name}__{args.learner}__g{args.gamma}__{args.seed}__{int(time.time())}"
    seeds = [args.seed + j for j in range(args.num_seeds)]
    regrets = run(args, seeds)[0]  # (seeds, K)
    cum = regrets.cumsum(1)
    slopes = [loglog_slope(c) for c in cum]
    print(
        f"final cumulative regret over {len(seeds)} seed(s): "
        f"{cum[:, -1].mean():.4f} +- {cum[:, -1].std():.4f}; "
        f"log-log slope {np.nanmean(slopes):.3f}"
    )
    path = os.path.join(args.out_dir, run_name)
    k = np.arange(1, args.episodes + 1)
    rows = [
        (s, kk, r, c) for j, s in enumerate(seeds) for kk, r, c in zip(k, regrets[j], cum[j], strict=True)
    ]
    np.savetxt(
        f"{path}.csv",
        rows,
        fmt=["%d", "%d", "%.6g", "%.6g"],
        delimiter=",",
        header="seed,episode,regret,cumulative_regret",
        comments="",
    )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for c in cum:
            ax.loglog(k, np.maximum(c, 1e-6), alpha=0.4)
        ax.loglog(k, np.maximum(cum.mean(0), 1e-6), "k", label=f"mean, slope {np.nanmean(slopes):.2f}")
        ax.set(
            xlabel="episode K",
            ylabel="cumulative regret",
            title=f"{args.learner} {args.env} gamma={args.gamma}",
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{path}.png", dpi=100)
        print(f"wrote {path}.png")
    print(f"wrote {path}.csv")
    return regrets


if __name__ == "__main__":
    main(tyro.cli(Args))
