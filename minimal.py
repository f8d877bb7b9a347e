"""
APA and PPO for RLHF in one file, to read from top to bottom: the embedded movie-review task, a tiny GPT, the loop.

Paper: Zhu et al. 2023, "Fine-Tuning Language Models with Advantage-Induced Policy Alignment", arXiv 2306.02231.
Run: python minimal.py (APA, a few minutes on a CPU); --algo=ppo runs PPO; any field of Config is a --key=value flag.
The one-file edition of train.py: on a CPU, with the default config, it prints train.py's numbers to the last digit and
ends with its weights to the bit, and its losses, GAE and KL-penalised reward are the functions of apa.py and ppo.py,
copied without their docstrings (tests/test_minimal.py checks all three). train.py adds the other algorithms and forms,
evaluation, checkpoints, your own models, and GPUs. Shapes: B responses, T response tokens, P prompt tokens, V tokens.

Where this departs from the paper (docs/theory.md explains each point):
1. The paper anchors APA's target on pi_init and takes the advantage from the score alone. Here it anchors on pi_old
   and the reward carries the per-token KL penalty, so the loss's fixed point is exactly pi* = pi_init exp(R/lambda)/Z.
2. One lambda is both the KL coefficient and APA's temperature. PPO whitens its advantages; APA does not.
3. The policy and the value head share one network; the value loss is clipped; a response cut at T ends there.
4. A KL guard stops an update once a minibatch's approx_kl passes target_kl (train.py's; not in the paper).
"""
import copy
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from data import sentiment_reward, task_corpus, task_encoding, task_prompts

# ---------------------------------------------------------------------------------------------
# config

@dataclass
class Config:
    algo: str = "apa"              # "apa" (apa_loss) or "ppo" (ppo_policy_loss)
    lam: float = 0.1               # lambda: the KL coefficient in the reward, and APA's Adv/lambda
    lr: float = 3e-5               # Adam's learning rate
    iters: int = 300               # RL iterations: one rollout and one update each
    batch_size: int = 64           # B, responses per rollout
    minibatch_size: int = 32       # responses per gradient step
    epochs: int = 4                # passes over each rollout
    gamma: float = 1.0             # discount
    gae_lambda: float = 0.95       # GAE's lambda
    cliprange: float = 0.2         # PPO's epsilon
    cliprange_value: float = 0.2   # the value loss is clipped to this distance from the rollout's values
    vf_coef: float = 0.1           # weight of the value loss
    max_grad_norm: float = 1.0     # gradient clipping
    target_kl: float = 0.2         # the KL guard: an update stops once a minibatch's approx_kl exceeds it (0: never)
    max_new_tokens: int = 20       # T, the response length limit (the task's reviews take at most 18 tokens)
    jstar_samples: int = 256       # samples per prompt from pi_init to estimate J* (at least 1)
    seed: int = 0                  # seeds sampling and the minibatches' order
    sft_dir: str = "out/sft"       # cache of the pre-trained pi_init, shared with train.py


def parse_args(argv):
    """Config from --key=value flags; each value takes the type of the field's default."""
    cfg = Config()
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        assert key in {f.name for f in fields(Config)}, f"unknown flag --{key}; Config's fields are the flags"
        setattr(cfg, key, type(getattr(cfg, key))(value))
    assert cfg.algo in ("apa", "ppo") and cfg.batch_size % cfg.minibatch_size == 0 and cfg.jstar_samples > 0, argv
    return cfg


# ---------------------------------------------------------------------------------------------
# the model: pi_init, a tiny GPT pre-trained on the task's reviews, and the policy with its value head

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, SFT_STEPS, SFT_LR = 2, 4, 128, 64, 300, 1e-3  # as train.py's defaults


def pretrain(enc):
    """pi_init: the tiny GPT trained to predict the next token of the grammar's reviews (the SFT step)."""
    torch.manual_seed(1234)                                              # the same pi_init for every run seed
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=enc.n_vocab, n_positions=BLOCK_SIZE, n_embd=N_EMBD, n_layer=N_LAYER,
                                    n_head=N_HEAD, bos_token_id=enc.eot_token, eos_token_id=enc.eot_token,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    docs = [enc.encode_ordinary(text) + [enc.eot_token] for text in task_corpus(20_000)]
    ids = torch.tensor([t for d in docs for t in d])                     # (N,) one stream of reviews
    opt = torch.optim.AdamW(lm.parameters(), lr=SFT_LR, weight_decay=0.0)
    t0 = time.time()
    for step in range(SFT_STEPS):
        starts = torch.randint(len(ids) - BLOCK_SIZE - 1, (64,))
        x = torch.stack([ids[s:s + BLOCK_SIZE] for s in starts])         # (64, C)
        y = torch.stack([ids[s + 1:s + BLOCK_SIZE + 1] for s in starts])  # (64, C) the next tokens
        loss = F.cross_entropy(lm(input_ids=x).logits.flatten(0, 1), y.flatten())
        for g in opt.param_groups:
            g["lr"] = SFT_LR * min(1.0, 2 * (1 - step / SFT_STEPS))      # flat, then linear decay
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"pre-training pi_init: step {step + 1}/{SFT_STEPS} | loss {loss.item():.3f} | "
                  f"{time.time() - t0:.0f}s", flush=True)
    return lm


def load_pi_init(cfg, enc):
    """pi_init, frozen: read from the cache in sft_dir (the folder train.py writes), or pre-trained and cached."""
    name = f"{enc.name}_V{enc.n_vocab}_L{N_LAYER}_H{N_HEAD}_D{N_EMBD}_C{BLOCK_SIZE}_S{SFT_STEPS}_lr{SFT_LR:g}"
    path, tmp = os.path.join(cfg.sft_dir, name), os.path.join(cfg.sft_dir, f"{name}.tmp{os.getpid()}")
    if not os.path.isdir(path):
        pretrain(enc).save_pretrained(tmp)
        os.replace(tmp, path)                                            # whole or absent, never half-written
    return GPT2LMHeadModel.from_pretrained(path).eval().requires_grad_(False)


def lm_forward(lm, input_ids, attention_mask, P):
    """ids, mask (B, P + T) -> the logits (B, T, V) that predict the T response tokens, the hidden states (B, T, H)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)          # (B, P + T) left padding skipped
    out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
             output_hidden_states=True, use_cache=False)
    return out.logits[:, P - 1:-1], out.hidden_states[-1][:, P - 1:-1]  # position t predicts token t + 1


def token_logprobs(logits, tokens):
    """log pi(tokens): logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


class PolicyWithValue(nn.Module):
    """pi_theta and V in one network: a causal LM with a linear value head on its last hidden state."""
    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)                               # V = 0 at the start
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, P):
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, P)  # (B, T, V), (B, T, H)
        return logits, self.v_head(hidden).squeeze(-1)                  # (B, T, V), (B, T)


# ---------------------------------------------------------------------------------------------
# sampling: responses at temperature 1, with the log-probs of the tokens drawn

@torch.no_grad()
def sample(cfg, lm, idx, prompt_tokens, enc):
    """lm's responses at temperature 1 to the prompts numbered idx, drawn with a KV cache until end-of-text or T tokens.
    Returns the prompts' ids and mask (B, P), padded on the left, the response, its mask (1 up to and including the
    first end-of-text) and the log-probs of its tokens (B, T), and the decoded completions."""
    prompts = [prompt_tokens[i] for i in idx]
    P, eot = max(map(len, prompts)), enc.eot_token
    prompt_ids = torch.tensor([[eot] * (P - len(p)) + p for p in prompts])  # (B, P)
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # (B, P)
    attn, pos = prompt_mask, (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    done = torch.zeros(len(prompts), dtype=torch.bool)                   # (B,)
    tokens, logprobs = [], []
    for _ in range(cfg.max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1], -1)                  # (B, V)
        tok = torch.where(done, eot, torch.multinomial(logp.exp(), 1).squeeze(-1))  # (B,) ended rows: padding
        tokens.append(tok)
        logprobs.append(logp.gather(1, tok[:, None]).squeeze(1))         # (B,)
        done |= tok == eot
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)        # (B, P + t)
        pos = pos[:, -1:] + 1                                            # (B, 1)
        out = lm(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, cache=out.cache, use_cache=True)
    response = torch.stack(tokens, 1)                                    # (B, T)
    is_eot = (response == eot).int()                                     # (B, T)
    mask = (is_eot.cumsum(1) - is_eot == 0).float()                      # (B, T) no end-of-text before t
    completions = [enc.decode([t for t in r if t != eot]) for r in response.tolist()]
    return prompt_ids, prompt_mask, response, mask, torch.stack(logprobs, 1) * mask, completions


@torch.no_grad()
def estimate_jstar(cfg, lm, prompt_tokens, prompts, enc):
    """J* = E_x[lambda log E_{y ~ pi_init}[exp(R/lambda)]] from pi_init's samples: J at pi*, the largest J of all."""
    torch.manual_seed(4321)                                              # the same estimate for every run
    rows, scores = torch.arange(len(prompts)).repeat_interleave(cfg.jstar_samples), []
    for chunk in rows.split(512):
        *_, completions = sample(cfg, lm, chunk.tolist(), prompt_tokens, enc)
        scores.append(torch.tensor(sentiment_reward([prompts[i] for i in chunk.tolist()], completions)))  # (512,)
    w = torch.exp(torch.cat(scores).double() / cfg.lam).view(len(prompts), -1)  # (prompts, n) exp(R / lambda)
    return (cfg.lam * w.mean(1).log()).mean().item()


# ---------------------------------------------------------------------------------------------
# the losses, GAE and the KL-penalised reward: copies of apa.py's and ppo.py's functions

# copy of ppo.py: masked_mean. The mean of x (B, T) over the entries where mask > 0, weighted by mask.
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


# copy of ppo.py: approx_kl. KL(pi_old || pi_theta) on the sampled tokens, E[(r - 1) - log r], r = pi_theta/pi_old.
@torch.no_grad()
def approx_kl(logprobs, old_logprobs, mask):
    log_ratio = logprobs - old_logprobs                          # (B, T)  log r_t
    return masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item()


# copy of ppo.py: kl_penalized_rewards (Ziegler et al. 2019, Eq. 2, per token). sum_t r_t estimates J = R - lambda KL.
def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    valid = (mask > 0).to(logprobs.dtype)                        # (B, T)
    rewards = -kl_coef * (logprobs - ref_logprobs) * valid       # (B, T)  KL penalty per token
    last = valid.sum(1).long() - 1                               # (B,)    index of the last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))  # (B, T)


# copy of ppo.py: gae (GAE paper, Eq. 16). A_t = delta_t + gamma gae_lambda A_{t+1}; V = 0 after the last token.
def gae(rewards, values, mask, gamma=1.0, gae_lambda=0.95):
    valid = (mask > 0).to(values.dtype)                          # (B, T)
    values, rewards = values * valid, rewards * valid            # (B, T) padding -> 0
    T = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # (B, T) V(s_{t+1})
    deltas = rewards + gamma * next_values - values              # (B, T) TD errors
    advantages = torch.zeros_like(deltas)                        # (B, T)
    running = torch.zeros_like(deltas[:, 0])                     # (B,)  A_{t+1}
    for t in reversed(range(T)):
        running = deltas[:, t] + gamma * gae_lambda * running           # (B,)  zero on padding: deltas are 0 there
        advantages[:, t] = running
    return advantages, (advantages + values) * valid


# copy of ppo.py: masked_whiten. (x - mean) / std over the masked entries (mean_fn: train.py's data parallel).
def masked_whiten(x, mask, eps=1e-8, mean_fn=masked_mean):
    mean = mean_fn(x, mask)                                      # ()
    var = mean_fn((x - mean) ** 2, mask)                         # ()  population variance
    return torch.where(mask > 0, (x - mean) * torch.rsqrt(var + eps), 0.0)  # (B, T)


# copy of apa.py: apa_loss (the paper's Sec. 3). L_APA = E[(log pi_theta - log pi_anchor - Adv/lambda)^2], with the
# anchor pi_old here (ref_logprobs=None: its fixed point is exactly pi*) and no bound (clip=0: train.py's --apa_clip).
def apa_loss(logprobs, old_logprobs, advantages, mask, lam, ref_logprobs=None, clip=0.0):
    anchor = old_logprobs if ref_logprobs is None else ref_logprobs  # (B, T) log pi_anchor(a_t|s_t)
    step = advantages / lam if not clip else (advantages / lam).clamp(-clip, clip)  # (B, T) Adv/lambda, bounded
    target = anchor + step                                       # (B, T) log of the target policy
    pg_loss = masked_mean((logprobs - target) ** 2, mask)        # ()     L_APA
    stats = {"approx_kl": approx_kl(logprobs, old_logprobs, mask)}
    if clip:                                                     # share of tokens whose target the bound moved
        stats["clipfrac"] = masked_mean(((advantages / lam).abs() > clip).to(logprobs.dtype), mask).item()
    return pg_loss, stats


# copy of ppo.py: ppo_policy_loss (PPO paper, Eq. 7). E_t[max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))].
def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
    ratio = torch.exp(logprobs - old_logprobs)                   # (B, T)  r_t
    pg_loss1 = -advantages * ratio                               # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)  # (B, T)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)   # ()
    clipfrac = masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask).item()
    return pg_loss, {"approx_kl": approx_kl(logprobs, old_logprobs, mask), "clipfrac": clipfrac}


# copy of ppo.py: value_loss. 0.5 E_t[max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)].
def value_loss(values, old_values, returns, mask, clip_eps=0.2):
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf_loss1 = (values - returns) ** 2                           # (B, T)
    vf_loss2 = (values_clipped - returns) ** 2                   # (B, T)
    vf_loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)  # ()
    vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).to(values.dtype), mask).item()
    return vf_loss, {"vf_clipfrac": vf_clipfrac}


# ---------------------------------------------------------------------------------------------
# rollout: generate, score, and everything the update needs

@torch.no_grad()
def rollout(cfg, policy, ref_lm, prompt_tokens, prompts, enc):
    """B responses from pi_old with what the update needs: the batch, P, the log line's stats, the samples."""
    # 1. generate: B prompts drawn at random, a response to each from pi_old
    idx = torch.randint(len(prompts), (cfg.batch_size,)).tolist()
    prompt_ids, prompt_mask, response, mask, _, completions = sample(cfg, policy.lm, idx, prompt_tokens, enc)
    # 2. score: the reward R(x, y) of each completion
    scores = torch.tensor(sentiment_reward([prompts[i] for i in idx], completions))  # (B,)
    input_ids = torch.cat([prompt_ids, response], 1)                     # (B, P + T)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response)], 1)  # (B, P + T)
    P = prompt_ids.shape[1]
    # 3. log-probs under pi_old and pi_init, and values: the update's forward pass, so that its first ratios are 1
    logits, values = policy(input_ids, attention_mask, P)                # (B, T, V), (B, T)
    logprobs = token_logprobs(logits, response)                          # (B, T) log pi_old
    ref_logprobs = token_logprobs(lm_forward(ref_lm, input_ids, attention_mask, P)[0], response)  # (B, T) log pi_init
    # 4. rewards and advantages: per-token rewards with the KL penalty, then GAE; PPO whitens its advantages
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, cfg.lam)  # (B, T)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)  # (B, T)
    if cfg.algo == "ppo":
        advantages = masked_whiten(advantages, mask)                     # (B, T)
    seq_kl = ((logprobs - ref_logprobs) * mask).sum(1)                   # (B,) sequence KL estimate
    stats = {"reward": scores.mean().item(), "kl": seq_kl.mean().item(), "J": (scores - cfg.lam * seq_kl).mean().item()}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, response=response, mask=mask,
                 old_logprobs=logprobs, advantages=advantages, old_values=values, returns=returns)
    return batch, P, stats, [(prompts[i], c, s) for i, c, s in zip(idx, completions, scores.tolist())]


# ---------------------------------------------------------------------------------------------
# update: epochs of minibatch steps; APA and PPO differ only in the policy loss

def update(cfg, policy, opt, batch, P):
    """Minibatch steps until the epochs end or the KL guard stops them: the means of their statistics, their number."""
    stats, stop = [], False
    for _ in range(cfg.epochs):                                          # each epoch in a new random order
        for mb_inds in torch.randperm(cfg.batch_size).split(cfg.minibatch_size):
            mb = {k: v[mb_inds] for k, v in batch.items()}
            logits, values = policy(mb["input_ids"], mb["attention_mask"], P)  # (b, T, V), (b, T)
            logprobs = token_logprobs(logits, mb["response"])            # (b, T) log pi_theta
            if cfg.algo == "apa":
                pg_loss, pg_stats = apa_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], cfg.lam)
            else:                                                        # PPO's clipped surrogate, whitened advantages
                pg_loss, pg_stats = ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                                    cfg.cliprange)
            vf_loss, vf_stats = value_loss(values, mb["old_values"], mb["returns"], mb["mask"], cfg.cliprange_value)
            stop = cfg.target_kl and pg_stats["approx_kl"] > cfg.target_kl  # the KL guard: pi_theta is far enough
            if stop:                                                     # from pi_old: no more steps on this batch
                break
            loss = pg_loss + cfg.vf_coef * vf_loss                       # ()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            stats.append({"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats, **vf_stats})
        if stop:
            break
    return {k: float(np.mean([s[k] for s in stats])) for k in (stats[0] if stats else [])} | {"steps": len(stats)}


# ---------------------------------------------------------------------------------------------
# the loop

def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    enc, prompts = task_encoding(), task_prompts()                       # the 40 openings "the <subject> <verb>"
    prompt_tokens = [enc.encode_ordinary(p) for p in prompts]
    ref_lm = load_pi_init(cfg, enc)                                      # pi_init, frozen, pre-trained as train.py's:
    torch.set_num_threads(1)                                             # with torch's threads; then one (small ops)
    jstar = estimate_jstar(cfg, ref_lm, prompt_tokens, prompts, enc)
    print(f"{cfg.algo} | lambda {cfg.lam} | lr {cfg.lr:g} | {len(prompts)} prompts | J* {jstar:.4f}", flush=True)
    torch.manual_seed(cfg.seed)
    policy = PolicyWithValue(copy.deepcopy(ref_lm).requires_grad_(True)).eval()  # starts at pi_init; no dropout
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    for it in range(cfg.iters):
        t0 = time.time()
        batch, P, stats, samples = rollout(cfg, policy, ref_lm, prompt_tokens, prompts, enc)
        stats.update(update(cfg, policy, opt, batch, P))
        # kl: a response's KL(pi_old || pi_init), in nats; approx_kl: a token's KL(pi_old || pi_theta) in the update
        print(f"iter {it + 1}/{cfg.iters} | reward {stats['reward']:.3f} | kl {stats['kl']:.3f} | J {stats['J']:.3f} | "
              f"gap {jstar - stats['J']:.3f} | approx_kl {stats['approx_kl']:.4f} | vf_loss {stats['vf_loss']:.4f} | "
              f"steps {stats['steps']} | {1000 * (time.time() - t0):.0f}ms", flush=True)
    for prompt, completion, score in samples[:4]:                        # a few of the last rollout's samples
        print(f"    {prompt!r} -> {completion!r} | reward {score:+.2f}")
    return policy


if __name__ == "__main__":
    main()
