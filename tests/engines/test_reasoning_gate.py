"""ReasoningGate: the reasoning budget and the answer's start, followed token by token as every engine does,
on harmony (gpt-oss) and ``<think>`` token sequences."""

from __future__ import annotations

from openai_harmony import Message, Role

from dynamo_lite.engines.reasoning import ANSWER, BEFORE, OTHER, REASONING, ReasoningGate, answer_so_far
from dynamo_lite.frontend.harmony import encoding, render_prompt
from dynamo_lite.frontend.reasoning import harmony_spec
from dynamo_lite.gpt_oss import vocab
from dynamo_lite.protocol import ReasoningSpec

PROMPT = render_prompt([{"role": "user", "content": "hi"}])  # ends with <|end|><|start|>assistant


def text(ids: list[int]) -> str:
    return encoding().decode_utf8(ids)


def play(gate: ReasoningGate, model: list[int], limit: int = 200) -> list[int]:
    """What the engine writes when the model would write ``model`` (then nothing but ``x``)."""
    out: list[int] = []
    filler = encoding().encode(" x", allowed_special="all")[0]
    for i in range(limit):
        forced = gate.forced
        token = forced if forced is not None else (model[i] if i < len(model) else filler)
        out.append(token)
        gate.advance(token)
        if gate.phase == ANSWER:
            break
    return out


def analysis(words: int) -> list[int]:
    m = Message.from_role_and_content(Role.ASSISTANT, "think " * words).with_channel("analysis")
    return encoding().render(m)[2:]  # the prompt wrote <|start|>assistant


def test_budget_closes_the_analysis_and_opens_final() -> None:
    gate = ReasoningGate(harmony_spec(12), PROMPT)
    out = play(gate, analysis(50))
    assert text(out).endswith("<|end|><|start|>assistant<|channel|>final<|message|>")
    assert text(out).startswith("<|channel|>analysis<|message|>")
    assert gate.in_answer and gate.reasoning_tokens == 12  # the forced tokens within the budget
    assert len(out) == 12


def test_budget_zero_opens_final_at_once_using_the_prompts_end() -> None:
    gate = ReasoningGate(harmony_spec(0), PROMPT)
    assert text(play(gate, analysis(5))) == "<|channel|>final<|message|>"


def test_forced_tokens_continue_what_the_model_began() -> None:
    model = analysis(3) + [vocab.START]  # ...<|end|><|start|> then the budget runs out
    gate = ReasoningGate(harmony_spec(len(model) + 4), PROMPT)  # + assistant<|channel|>final<|message|>
    out = play(gate, model)
    assert text(out) == text(model) + "assistant<|channel|>final<|message|>"


def test_a_model_that_answers_in_time_is_left_alone() -> None:
    final = encoding().render(Message.from_role_and_content(Role.ASSISTANT, "ok").with_channel("final"))
    model = analysis(3) + final
    gate = ReasoningGate(harmony_spec(1000), PROMPT)
    out = play(gate, model)
    assert out == model[: len(out)] and gate.phase == ANSWER
    assert text(out).endswith("<|channel|>final<|message|>")


def test_commentary_ends_the_reasoning_without_an_answer() -> None:
    call = Message.from_role_and_content(Role.ASSISTANT, "{}").with_channel("commentary")
    model = analysis(2) + encoding().render(call.with_recipient("functions.f").with_content_type("json"))
    gate = ReasoningGate(harmony_spec(len(analysis(2)) + 18), PROMPT)  # the header and the closing count too
    for token in model:
        assert gate.forced in (None, token)  # only the analysis opening, as the model writes it
        gate.advance(token)
    assert gate.phase == OTHER and not gate.in_answer


def test_replay_across_the_handoff_matches_one_run() -> None:
    spec = harmony_spec(3)
    one = ReasoningGate(spec, PROMPT)
    out = play(one, analysis(20))
    first, rest = out[:1], out[1:]
    gate, answer = answer_so_far(spec, PROMPT, first)
    assert answer == [] and gate.reasoning_tokens == 1
    assert play(gate, rest) == rest


def test_think_tags() -> None:
    close, nl, think = [900], [13], [800]
    spec = ReasoningSpec(budget=4, answer_ids=close, forced_ids=nl + close, start_ids=think)
    gate = ReasoningGate(spec, [1, 2, 3])
    assert gate.phase == BEFORE  # qwen3: reasoning only once <think> comes
    for token in [7, *think]:
        gate.advance(token)
    assert gate.phase == REASONING
    assert play(gate, [5, 6, 7, 8]) == [5, 6, 13, 900]
    assert ReasoningGate(spec, [1, *think, 13]).phase == REASONING  # the template opened it


def test_a_budgeted_harmony_answer_opens_with_analysis() -> None:
    gate = ReasoningGate(harmony_spec(4), PROMPT)
    out = play(gate, [vocab.START] * 50)  # whatever the model would write
    assert text(out).startswith("<|channel|>analysis<|message|>")
    assert text(out).endswith("<|end|><|start|>assistant<|channel|>final<|message|>")
