"""Speed of flow_noise_ppo.py: seconds per PPO update (synthetic batch, the script's loss) and env steps/s
of chunked rollouts (policy sampling + simulator), on CPU or GPU.

    OMP_NUM_THREADS=1 python bench/flow_noise_ppo_speed.py --env-id PickCube-v1 --num-envs 2
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_noise_ppo as fnp  # noqa: E402


@dataclass
class Bench:
    env_id: str = "PickCube-v1"
    """env for the rollout measurement"""
    num_envs: int = 2
    """parallel envs"""
    backbone: str = "mlp"
    """mlp or transformer"""
    logprob_type: str = "token"
    """token or chunk"""
    rollout_chunks: int = 40
    """chunk decisions per env to time (after 2 warm-up chunks)"""
    updates: int = 2
    """PPO updates to time (after one warm-up update)"""
    cuda: bool = True
    """use CUDA when it exists"""


def main(b: Bench):
    torch.manual_seed(0)
    args = fnp.Args(env_id=b.env_id, num_envs=b.num_envs, backbone=b.backbone, logprob_type=b.logprob_type)
    device = torch.device("cuda" if torch.cuda.is_available() and b.cuda else "cpu")
    envs = fnp.VecEnv(args, b.num_envs, device)
    N, C, K, H, A = (
        b.num_envs,
        args.num_action_chunks,
        args.denoising_steps,
        args.action_horizon,
        envs.act_dim,
    )
    policy = fnp.FlowNoisePolicy(envs.obs_dim, A, H, K, args.sigma_min, args.sigma_max, b.backbone).to(device)
    critic = fnp.make_critic(envs.obs_dim).to(device)
    opt = torch.optim.Adam(list(policy.parameters()) + list(critic.parameters()), lr=1e-4)
    mask = fnp.executed_mask(H, A, C, device=device)

    # rollout: the same calls as the script's inner loop
    obs = envs.reset(seed=0)
    for i in range(b.rollout_chunks + 2):
        if i == 2:
            t0 = time.perf_counter()
        with torch.no_grad():
            chain, mu, sigma = policy.sample(obs)
            fnp.chain_log_prob(chain, mu, sigma, mask, args.logprob_type)
            critic(policy.normalize(obs))
        alive = torch.ones(N, dtype=torch.bool, device=device)
        obs = fnp.step_chunk(envs, policy.to_env(chain[:, -1, :C]), alive, fnp.new_episodes(N, device))[0]
        obs = envs.reset_done(~alive, obs)
    rollout_sps = b.rollout_chunks * N * C / (time.perf_counter() - t0)
    envs.close()

    # update: one PPO update = update_epochs x num_minibatches over num_steps * num_envs chunk samples
    B = args.num_steps * N
    obs_b = torch.randn(B, envs.obs_dim, device=device)
    with torch.no_grad():
        chain, mu, sigma = policy.sample(obs_b)
        old = fnp.chain_log_prob(chain, mu, sigma, mask, args.logprob_type)
    adv, ret, val = (torch.randn(B, device=device) for _ in range(3))
    mb = B // args.num_minibatches
    times = []
    for u in range(b.updates + 1):
        t0 = time.perf_counter()
        for _ in range(args.update_epochs):
            perm = torch.randperm(B, device=device)
            for s in range(0, B, mb):
                i = perm[s : s + mb]
                mu2, sigma2 = policy.chain_gaussians(obs_b[i], chain[i])
                new = fnp.chain_log_prob(chain[i], mu2, sigma2, mask, args.logprob_type)
                v = critic(policy.normalize(obs_b[i])).squeeze(-1)
                ent = fnp.chain_entropy(sigma2, mask).mean()
                pg_loss = fnp.policy_loss(new, old[i], adv[i], mask, args.clip_coef)[0]
                v_loss = fnp.value_loss(v, val[i], ret[i])
                loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * ent
                opt.zero_grad()
                loss.backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if u > 0:
            times.append(time.perf_counter() - t0)
    print(
        f"device={device.type} env={b.env_id} num_envs={N} backbone={b.backbone} logprob={b.logprob_type} "
        f"H={H} C={C} K={K} | rollout env steps/s={rollout_sps:.1f} | PPO update "
        f"({B} chunks, {args.update_epochs} epochs x {args.num_minibatches} minibatches) "
        f"s/update={sum(times) / len(times):.3f}"
    )


if __name__ == "__main__":
    main(tyro.cli(Bench))
