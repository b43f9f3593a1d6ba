"""How much does a model use each stated fact? Swap one word of the caption and measure the loss.

    .venv/bin/python benchmarks/caption_probe.py --model models/default [--n 128] [--t 98,90,70,50,30,10]

Real one-object images whose caption states a place and a colour (``generate(i)`` from index
100000 on, never trained on) are masked at timestep t by q(x_t | x0). The mean NLL of the masked
tokens under the true caption is compared with the same caption with its place swapped (left <->
right, top <-> bottom) and with its colour swapped. A model that ignores a word shows no gap for
it; a model that follows it pays for the wrong word. Prints one row per t.

Then two checks of places alone:
- text gap: the largest per-token distance between the text encoder's embeddings (unit vectors) of
  two captions that differ in one word ("on the left" / "on the right"; a colour swap for scale);
- layout at t = T: with every token masked, where is the model unsure? The share of
  sum(1 - max_k p(x0 = k)) that lies in the half of the grid the place names, over 8 captions
  (0.5: the place word is ignored; 1.0: all of the object's mass is in that half).
"""

from __future__ import annotations

import argparse

import torch

from vqdiff.model.diffusion import Schedule, q_sample
from vqdiff.model.io.folder import load_model
from vqdiff.model.shapes.scenes import generate

PLACE_SWAP = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
COLOUR_SWAP = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "purple": "orange", "orange": "purple"}


def probe_set(n: int, start: int = 100_000):
    """(images (n, 3, S, S) in [0, 1], true captions, place-swapped, colour-swapped)."""
    images, true, place, colour = [], [], [], []
    i = start
    while len(true) < n:
        image, caption, stated, scene = generate(i)
        i += 1
        m = stated.mentions[0]
        if len(scene.objects) != 1 or m.place is None or m.colour is None:
            continue
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)  # (3, S, S)
        true.append(caption)
        place.append(caption.replace(m.place, PLACE_SWAP[m.place]))
        colour.append(caption.replace(m.colour, COLOUR_SWAP[m.colour]))
    return torch.stack(images), true, place, colour


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--t", default="98,90,70,50,30,10", help="timesteps to mask at")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = load_model(args.model).eval()
    images, true, place, colour = probe_set(args.n)
    x0 = model.vqvae.tokenize(images)  # (n, N)
    schedule = Schedule(model.config.diffusion)
    mask_id = model.config.transformer.num_embed
    texts = {name: model.encode_text(c) for name, c in (("true", true), ("place", place), ("colour", colour))}
    g = torch.Generator().manual_seed(args.seed)
    print(f"model {args.model}, {args.n} one-object images with a stated place and colour")
    print(f"{'t':>3s} {'true':>8s} {'place swapped':>14s} {'colour swapped':>15s}   (mean NLL of masked tokens, nats)")
    for t_ in (int(x) for x in args.t.split(",")):
        t = torch.full((args.n,), t_)
        x_t = q_sample(schedule, x0, t, generator=g)  # (n, N)
        masked = x_t == mask_id  # (n, N)
        nll = {}
        for name, text in texts.items():
            log_p = model.transformer.log_probs(x_t, t, text)  # (n, N, K)
            nll[name] = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)[masked].mean().item()
        print(f"{t_:3d} {nll['true']:8.4f} {nll['place']:14.4f} {nll['colour']:15.4f}")

    for a, b in (("a red circle on the left", "a red circle on the right"),
                 ("a red circle at the top", "a red circle at the bottom"),
                 ("a red circle on the left", "a blue circle on the left")):
        print(f"text gap {a!r} / {b!r}: {text_gap(model, a, b):.2f}")
    shares = {place: half_share(model, place) for place in PLACE_SWAP}
    print("layout at t = T, share in the named half: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))


def text_gap(model, a: str, b: str) -> float:
    e = model.encode_text([a, b]).float()  # (2, L, D), unit vectors per token
    return (e[0] - e[1]).norm(dim=-1).max().item()


def half_share(model, place: str) -> float:
    c = model.config.transformer
    phrase = f"on the {place}" if place in ("left", "right") else f"at the {place}"
    prompts = [f"a {col} {shape} {phrase}" for col in ("red", "yellow", "purple", "orange") for shape in ("circle", "square")]
    b = len(prompts)
    x_t = torch.full((b, c.num_tokens), c.num_embed)  # (b, N) all masked
    t = torch.full((b,), c.num_timesteps - 1)
    p = model.transformer.log_probs(x_t, t, model.encode_text(prompts)).exp()  # (b, N, K)
    unsure = (1 - p.max(-1).values).mean(0).view(c.height, c.width)  # (h, w)
    half = {"left": unsure[:, : c.width // 2], "right": unsure[:, c.width // 2:],
            "top": unsure[: c.height // 2], "bottom": unsure[c.height // 2:]}[place]
    return (half.sum() / unsure.sum()).item()


if __name__ == "__main__":
    main()
