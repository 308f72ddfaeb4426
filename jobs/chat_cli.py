"""Chat with a trained model in the terminal, or answer one prompt and exit.

    python -m jobs.chat_cli --source sft                     # interactive: 'clear' starts over, 'quit' or Ctrl-D ends
    python -m jobs.chat_cli --source sft -p "Why is the sky blue?"
    python -m jobs.chat_cli --source base -p "The capital of France is"   # a base model continues the text

The model comes from the run's store (VIBECHAT_STORE / VIBECHAT_RUN, or VIBECHAT_BASE_DIR).
"""

import argparse

from vibechat.checkpoint_manager import load_model
from vibechat.common import VibechatError, autocast_dtype, compute_init, nonnegative_int, run_main
from vibechat.engine import Engine

# how the calculator tool's tokens show in a streamed reply
TOOL_MARKERS = {"<|python_start|>": "[python: ", "<|python_end|>": "]", "<|output_start|>": " [output: ",
                "<|output_end|>": "] "}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.chat_cli",
                                     description="Chat with a vibechat model, or complete one prompt with -p.")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                        help="which phase's checkpoint to load (default: sft); base models continue text")
    parser.add_argument("--model-tag", default=None, help="model to load, e.g. d20 (default: the largest)")
    parser.add_argument("--step", type=nonnegative_int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-p", "--prompt", default=None, help="answer this prompt, print the reply and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6,
                        help="sampling temperature, 0 for greedy (default: 0.6)")
    parser.add_argument("-k", "--top-k", type=int, default=50,
                        help="sample among the k most likely tokens (default: 50)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens (default: 512)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"],
                        help="where to run (default: the best available)")
    args = parser.parse_args(argv)
    if not args.temperature >= 0:
        raise VibechatError(f"--temperature {args.temperature} is not allowed: use 0 for greedy or a positive value")
    for option, value in [("--top-k", args.top_k), ("--max-tokens", args.max_tokens)]:
        if value < 1:
            raise VibechatError(f"{option} {value} is not allowed: use 1 or more")
    return args


def stream_reply(engine: Engine, tokens: list[int], args: argparse.Namespace) -> list[int]:
    """Print the model's reply to `tokens` as it is generated; returns its tokens, without the stop token."""
    tokenizer = engine.tokenizer
    markers = {tokenizer.encode_special(name): text for name, text in TOOL_MARKERS.items()}
    reply, run, printed = [], [], ""  # run: the tokens of the text since the last marker; printed: its text shown
    for column, _ in engine.generate(tokens, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k):
        token = column[0]
        if token in engine.stop_tokens:
            break
        reply.append(token)
        if token in markers:
            print(tokenizer.decode(run)[len(printed):] + markers[token], end="", flush=True)
            run, printed = [], ""
            continue
        run.append(token)
        text = tokenizer.decode(run)
        if not text.endswith("\ufffd"):  # else a multi-byte character is still incomplete
            print(text[len(printed):], end="", flush=True)
            printed = text
    print(tokenizer.decode(run)[len(printed):], flush=True)
    return reply


def main() -> None:
    args = parse_args()
    _, _, _, _, device = compute_init(args.device)
    model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
    model.to(dtype=autocast_dtype(device))  # bf16 weights on GPU: decoding reads every weight once per token
    engine = Engine(model, tokenizer)
    chat = args.source != "base"
    bos = tokenizer.get_bos_token_id()
    user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")

    def prompt_tokens(conversation: list[int], text: str) -> list[int]:
        if chat:
            return conversation + [user_start, *tokenizer.encode(text), user_end, assistant_start]
        return [bos, *tokenizer.encode(text)]  # a base model continues each prompt on its own

    if args.prompt is not None:
        stream_reply(engine, prompt_tokens([bos], args.prompt), args)
        return

    print(f"vibechat {args.source} model, step {meta.get('step', '?')}, on {device}. "
          "'clear' starts over, 'quit' or Ctrl-D ends.")
    if engine.use_cuda_graph:
        print("(the first reply waits while the decode step compiles, about a minute)")
    conversation = [bos]
    while True:
        try:
            text = input("\nUser: " if chat else "\nPrompt: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("quit", "exit"):
            return
        if text == "clear":
            conversation = [bos]
            print("(conversation cleared)")
            continue
        if not text:
            continue
        tokens = prompt_tokens(conversation, text)
        print("Assistant: " if chat else text, end="", flush=True)
        try:
            reply = stream_reply(engine, tokens, args)
        except VibechatError as e:  # e.g. the conversation outgrew the context: say so and keep serving
            print(f"\nerror: {e}")
            continue
        conversation = tokens + reply + [assistant_end]


if __name__ == "__main__":
    run_main(main)
