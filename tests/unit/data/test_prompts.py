import json

import pytest

from keel.config import DataConfig
from keel.data.prompts import DataError, Prompt, PromptSampler, load_prompts


class CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = [ord(c) for c in text]

        return Out()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _write(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_metadata_and_overlong_policies(tmp_path):
    path = _write(
        tmp_path, [json.dumps({"prompt": "1+1=", "answer": 2}), "", json.dumps({"prompt": "x" * 20, "answer": 0})]
    )
    for policy, n, truncated, dropped in (("drop", 1, 0, 1), ("truncate", 2, 1, 0)):
        cfg = DataConfig(prompts=str(path), metadata_fields=["answer"], overlong_prompts=policy)
        out = load_prompts(cfg, CharTokenizer(), max_prompt_tokens=8)
        assert (len(out.prompts), out.truncated, out.dropped) == (n, truncated, dropped)
        assert out.prompts[0].metadata == {"answer": "2"} and out.prompts[0].token_ids == tuple(map(ord, "1+1="))
    with pytest.raises(DataError, match=r"p.jsonl:3: prompt has 20 tokens, limit is 8"):
        load_prompts(DataConfig(prompts=str(path), overlong_prompts="error"), CharTokenizer(), 8)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"p.jsonl:2: not valid JSON"),
        ("[1, 2]", r"p.jsonl:2: expected a JSON object, got list"),
        (json.dumps({"text": "a"}), r"p.jsonl:2: missing field 'prompt'"),
        (json.dumps({"prompt": 5}), r"p.jsonl:2: field 'prompt' must be a string, got int"),
        (json.dumps({"prompt": "  "}), r"p.jsonl:2: field 'prompt' is empty"),
        (json.dumps({"prompt": "a"}), r"p.jsonl:2: missing metadata field 'answer'"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "answer": 1}), line])
    with pytest.raises(DataError, match=message):
        load_prompts(DataConfig(prompts=str(path), metadata_fields=["answer"]), CharTokenizer(), 64)


def test_duplicate_prompt_ids_name_both_rows(tmp_path):
    rows = [{"id": "a", "prompt": "1+1="}, {"id": "b", "prompt": "2+2="}, {"id": "a", "prompt": "3+3="}]
    path = _write(tmp_path, [json.dumps(r) for r in rows])
    with pytest.raises(DataError, match=r"p.jsonl:3: prompt id 'a' is already used by .*p.jsonl:1$"):
        load_prompts(DataConfig(prompts=str(path), id_field="id"), CharTokenizer(), 64)
    missing = _write(tmp_path, [json.dumps({"id": "a", "prompt": "x"}), json.dumps({"prompt": "y"})])
    with pytest.raises(DataError, match=r"p.jsonl:2: missing id field 'id'"):
        load_prompts(DataConfig(prompts=str(missing), id_field="id"), CharTokenizer(), 64)


def test_sampler_covers_each_prompt_once_per_epoch_and_resumes():
    prompts = [Prompt(str(i), "p", (1,)) for i in range(10)]
    s = PromptSampler(prompts, batch_size=5, seed=1)
    epoch0 = [p.prompt_id for _ in range(2) for p in s.next_batch()]
    assert sorted(epoch0, key=int) == [str(i) for i in range(10)]
    state = s.state()
    nxt = [p.prompt_id for p in s.next_batch()]
    s2 = PromptSampler(prompts, batch_size=5, seed=1)
    s2.load_state(state)
    assert [p.prompt_id for p in s2.next_batch()] == nxt
    with pytest.raises(DataError, match="prompts_per_step is 11 but the prompt set has only 10"):
        PromptSampler(prompts, batch_size=11, seed=0)


def test_prompts_handed_back_come_next_and_none_is_lost():
    prompts = [Prompt(str(i), str(i), (i,)) for i in range(12)]
    sampler = PromptSampler(prompts, batch_size=4, seed=0)
    first = sampler.next_batch()
    second = sampler.next_batch()
    sampler.give_back(second)  # its samples were thrown away
    again = sampler.next_batch()
    assert again == second
    rest = sampler.next_batch()
    assert sorted(p.prompt_id for p in first + again + rest) == sorted(p.prompt_id for p in prompts)
