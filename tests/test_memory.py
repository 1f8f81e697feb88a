"""Agent memory: retrieval quality with the real MiniLM, and the store's contract.

Retrieval is measured on a small labelled set written here: each query paraphrases one
memory and must find it in the top 3. The contract tests (isolation, persistence, filters,
validation, concurrency) use ``bag_of_words``, a cheap exact embedding, where the
embedding's quality does not matter, so a stateful property test can run hundreds of steps
against a brute-force reference in a second.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from llmos_kernel import store
from llmos_kernel.core.embedder import Embedder
from llmos_kernel.errors import InvalidArgument, NotFound, QuotaExceeded, Unavailable
from llmos_kernel.services.memory import MAX_K, MemoryItem, MemoryStore

MEMORIES = {
    "dentist": "My dentist appointment is on March 14th at 9:30 with Dr. Alvarez.",
    "wifi": "The office Wi-Fi password is hunter2-blue, and the guest network has none.",
    "allergy": "The user is allergic to peanuts and carries an EpiPen.",
    "sister": "Maria, the user's sister, lives in Lisbon and works as an architect.",
    "deploy": "Production deploys happen on Tuesdays after the 2 pm change-review meeting.",
    "python": "The project targets Python 3.11 and uses ruff for linting.",
    "budget": "The marketing budget for Q3 is 40,000 euros, half of it for online ads.",
    "plant": "Water the fiddle-leaf fig once a week and keep it out of direct afternoon sun.",
    "car": "The car is due for an oil change at 90,000 kilometres.",
    "flight": "Flight LH 1234 to Munich leaves from terminal 2 at 7:05 on Friday.",
    "coffee": "The user takes their coffee black, with no sugar.",
    "gym": "Leg day is Monday, upper body on Wednesday, cardio on Saturday morning.",
    "recipe": "Grandma's lasagne needs ricotta, nutmeg and a béchamel made with whole milk.",
    "server": "The staging database runs on host db-staging-02 on port 5433.",
    "book": "Currently reading 'The Left Hand of Darkness' by Ursula K. Le Guin, on chapter 7.",
    "dog": "Biscuit the beagle needs his heartworm pill on the first of every month.",
    "language": "The user is learning Japanese and practises kanji for twenty minutes a day.",
    "rent": "Rent of 1,250 dollars is due on the 1st; the landlord prefers bank transfer.",
    "birthday": "Tom's birthday is on July 22nd and he collects vinyl jazz records.",
    "password_policy": "Company policy: passwords rotate every 90 days and need 14 characters.",
    "bug": "Issue 4711: the export button crashes when the report has more than 10,000 rows.",
    "weather_pref": "The user dislikes hot weather and prefers holidays in cool, rainy places.",
    "insurance": "The home insurance policy number is HX-99812, renewed every November.",
    "meeting_notes": "In Monday's sync we agreed to drop the mobile app and focus on the web "
                     "client.",
    "vaccine": "The next tetanus booster is due in 2031.",
    "recycling": "Glass recycling is collected every other Thursday; put the bin out the night "
                 "before.",
    "guitar": "The user is practising the F barre chord on guitar and finds it hard.",
    "tax": "The tax return must be filed by 31 July; the accountant is named Priya.",
    "hike": "Next month's hike is the ridge trail near Zermatt, about 18 km with 1,100 m of "
            "climb.",
    "kid_school": "Lena's school closes early at noon every Wednesday.",
    "printer": "The third-floor printer jams unless you use 80 g/m² paper.",
    "api_key": "The payments API key expires on December 1st and must be rotated by ops.",
    "movie": "The user loved the film Arrival and wants more slow, thoughtful science fiction.",
    "sleep": "The user goes to bed around 11 pm and wakes at 6:30 on weekdays.",
}

QUERIES = [
    ("When do I need to see the dentist?", "dentist"),
    ("how do I get onto the internet at work", "wifi"),
    ("Which foods could cause a severe reaction for me?", "allergy"),
    ("Where does my sibling live?", "sister"),
    ("What day of the week do we ship releases to prod?", "deploy"),
    ("What is the advertising spend for the third quarter?", "budget"),
    ("How should I care for my houseplant?", "plant"),
    ("When does my vehicle need maintenance?", "car"),
    ("What time is my plane to Germany?", "flight"),
    ("How do I like my morning drink?", "coffee"),
    ("What is my workout schedule?", "gym"),
    ("ingredients for the family pasta bake", "recipe"),
    ("Which machine hosts the test environment's DB?", "server"),
    ("What novel am I in the middle of?", "book"),
    ("When does the puppy get his medicine?", "dog"),
    ("How much do I pay for my apartment each month?", "rent"),
    ("What gift would Tom like?", "birthday"),
    ("How often must I change my login credentials at the company?", "password_policy"),
    ("Why does exporting large reports fail?", "bug"),
    ("Where should I go on vacation?", "weather_pref"),
    ("What did the team decide about the phone app?", "meeting_notes"),
    ("When should I put the bottles out for collection?", "recycling"),
    ("Which chord am I struggling with?", "guitar"),
    ("Who helps me with my taxes and what is the deadline?", "tax"),
    ("How long is the mountain walk we planned?", "hike"),
    ("When is my daughter's early pickup?", "kid_school"),
    ("Recommend me a movie", "movie"),
    ("When do I usually fall asleep?", "sleep"),
]


def bag_of_words(texts: list[str]) -> np.ndarray:
    """Word counts hashed into 32 buckets, plus a constant so no vector is zero."""
    out = np.zeros((len(texts), 32), dtype=np.float32)
    out[:, 0] = 1
    for row, text in zip(out, texts):
        for word in re.findall(r"\w+", text.lower()):
            row[1 + zlib.crc32(word.encode()) % 31] += 1
    return out


def cosine(a: str, b: str) -> float:
    u, v = bag_of_words([a, b]).astype(np.float64)
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    try:
        return Embedder.load("minilm")
    except NotFound:
        store.pull("minilm")
        return Embedder.load("minilm")


@pytest.fixture
def memory(tmp_path):
    with MemoryStore(tmp_path / "memory.sqlite", bag_of_words) as memory:
        yield memory


def test_each_paraphrased_query_finds_its_memory_in_the_top_3(embedder, tmp_path):
    with MemoryStore(tmp_path / "memory.sqlite", embedder.embed) as memory:
        added = memory.add_many(1, [(text, {"key": key}) for key, text in MEMORIES.items()])
        key_of = {item.id: item.metadata["key"] for item in added}
        ranks = []
        for query, wanted in QUERIES:
            found = [key_of[item.id] for item in memory.search(1, query, k=len(MEMORIES))]
            ranks.append(found.index(wanted) + 1)
            assert wanted in found[:3], (query, found[:3])
    ranks = np.array(ranks)
    print(f"\nmemory retrieval, {len(MEMORIES)} memories, {len(QUERIES)} queries: "
          f"recall@1 {np.mean(ranks == 1):.3f}  recall@3 {np.mean(ranks <= 3):.3f}  "
          f"MRR {np.mean(1 / ranks):.3f}")


def test_memories_and_their_scores_survive_reopening(embedder, tmp_path):
    path = tmp_path / "state" / "memory.sqlite"
    texts = ["The boiler was serviced in May.", "Anna prefers tea to coffee."]
    with MemoryStore(path, embedder.embed) as memory:
        first = memory.add(3, texts[0], {"room": "basement"})
        memory.add(3, texts[1])
        before = memory.search(3, "When was the heating checked?", k=2)
    with MemoryStore(path, embedder.embed) as memory:
        assert memory.count(3) == 2
        assert memory.get(3, first.id) == first
        after = memory.search(3, "When was the heating checked?", k=2)
    assert [i.id for i in after] == [i.id for i in before] and after[0].text == texts[0]
    np.testing.assert_allclose([i.score for i in after], [i.score for i in before], atol=1e-6)


def test_a_pid_sees_only_its_own_memories(memory):
    mine = memory.add(1, "the launch code is 0000", {"secret": True})
    memory.add(2, "the launch code is on a sticky note")
    assert [i.id for i in memory.search(2, "launch code", k=10)] != [mine.id]
    assert all(i.id != mine.id for i in memory.search(2, "launch code", k=10))
    assert memory.search(3, "launch code") == []
    assert (memory.count(1), memory.count(2), memory.count(3)) == (1, 1, 0)
    with pytest.raises(NotFound) as foreign:
        memory.get(2, mine.id)
    missing_id = "0" * len(mine.id)
    with pytest.raises(NotFound) as missing:
        memory.get(2, missing_id)
    assert str(foreign.value).replace(mine.id, "ID") == str(missing.value).replace(missing_id, "ID")
    with pytest.raises(NotFound):
        memory.delete(2, mine.id)
    assert memory.clear(2) == 1
    assert memory.get(1, mine.id) == mine


def test_search_ranks_by_cosine_and_filters_on_metadata(memory):
    texts = ["red apples and green pears", "red cars", "green tea", "apples apples apples"]
    for n, text in enumerate(texts):
        memory.add(5, text, {"n": n, "colourful": "red" in text or "green" in text})
    results = memory.search(5, "red apples", k=3)
    expected = sorted(texts, key=lambda t: -cosine("red apples", t))[:3]
    assert [i.text for i in results] == expected
    assert [i.score for i in results] == pytest.approx([cosine("red apples", t) for t in expected])
    filtered = memory.search(5, "red apples", k=10, where={"colourful": True})
    assert {i.text for i in filtered} == set(texts[:3])
    assert [i.text for i in memory.search(5, "tea", where={"n": 2, "colourful": True})] == [
        "green tea"]
    assert memory.search(5, "tea", where={"n": 2, "colourful": False}) == []


def test_filters_match_json_values_exactly(memory):
    for value in (1, 1.0, True, "1", [1], None):
        memory.add(4, f"value {value!r}", {"v": value})
    assert [i.metadata for i in memory.search(4, "value", k=10, where={"v": 1})] == [{"v": 1}]
    assert [i.metadata for i in memory.search(4, "value", k=10, where={"v": [1]})] == [
        {"v": [1]}]
    assert len(memory.search(4, "value", k=10, where={})) == 6
    assert memory.search(4, "value", where={"missing": None}) == []


def test_delete_clear_and_count(memory):
    a, b, c = memory.add_many(9, [("alpha", None), ("beta", {"x": 1}), ("gamma", {})])
    assert memory.count(9) == 3
    memory.delete(9, b.id)
    assert memory.count(9) == 2
    assert {i.id for i in memory.search(9, "alpha beta gamma", k=10)} == {a.id, c.id}
    with pytest.raises(NotFound, match="no memory with id"):
        memory.delete(9, b.id)
    assert memory.clear(9) == 2
    assert memory.count(9) == 0 and memory.search(9, "alpha") == []
    assert memory.clear(9) == 0
    assert memory.add_many(9, []) == []


@pytest.mark.parametrize(
    "call, complaint",
    [
        (lambda m: m.add(1, b"bytes"), "text must be a str, got bytes"),
        (lambda m: m.add(1, None), "text must be a str, got NoneType"),
        (lambda m: m.add(1, "  \n"), "text is empty"),
        (lambda m: m.add(1, "\ud800 lone surrogate"), "not valid Unicode"),
        (lambda m: m.add(1, "é" * 33), "66 bytes of UTF-8, over the limit of 64"),
        (lambda m: m.add(1, "ok", ["not", "a dict"]), "metadata must be a dict, got list"),
        (lambda m: m.add(1, "ok", {1: "int key"}), "metadata must be JSON"),
        (lambda m: m.add(1, "ok", {"t": (1, 2)}), "metadata must be JSON"),
        (lambda m: m.add(1, "ok", {"s": {1, 2}}), "metadata must be JSON"),
        (lambda m: m.add(1, "ok", {"x": float("nan")}), "metadata must be JSON"),
        (lambda m: m.add(1, "ok", {"long": "x" * 64}), "over the limit of 64"),
        (lambda m: m.add(-1, "ok"), "pid must be an int >= 0"),
        (lambda m: m.add(True, "ok"), "pid must be an int >= 0"),
        (lambda m: m.add_many(1, ("ok", None)), "items must be a list"),
        (lambda m: m.add_many(1, [("ok",)]), r"items\[0\] must be a \(text, metadata\) pair"),
        (lambda m: m.add_many(1, [("ok", None), (3, None)]), r"items\[1\] text must be a str"),
        (lambda m: m.search(1, "q", k=0), f"k must be an int from 1 to {MAX_K}, got 0"),
        (lambda m: m.search(1, "q", k=MAX_K + 1), f"got {MAX_K + 1}"),
        (lambda m: m.search(1, "q", k=2.0), "got 2.0"),
        (lambda m: m.search(1, "q", k=True), "got True"),
        (lambda m: m.search(1, 42), "query must be a str, got int"),
        (lambda m: m.search(1, ""), "query is empty"),
        (lambda m: m.search(1, "q", where="topic=x"), "where must be a dict, got str"),
        (lambda m: m.search(1, "q", where={"x": object()}), "where must be JSON"),
        (lambda m: m.get(1, 7), "a memory id is a str, got int"),
        (lambda m: m.delete(1, None), "a memory id is a str, got NoneType"),
    ],
)
def test_bad_input_is_a_typed_error_and_changes_nothing(tmp_path, call, complaint):
    with MemoryStore(tmp_path / "m.sqlite", bag_of_words, max_text_bytes=64) as memory:
        with pytest.raises(InvalidArgument, match=complaint):
            call(memory)
        assert memory.count(1) == 0


def test_the_quota_is_per_pid_and_all_or_nothing(tmp_path):
    with MemoryStore(tmp_path / "m.sqlite", bag_of_words, max_items_per_pid=3) as memory:
        memory.add_many(1, [("one", None), ("two", None)])
        with pytest.raises(QuotaExceeded, match="pid 1 holds 2 memories and may hold 3"):
            memory.add_many(1, [("three", None), ("four", None)])
        assert memory.count(1) == 2
        memory.add_many(2, [("a", None), ("b", None), ("c", None)])
        memory.add(1, "three")
        with pytest.raises(QuotaExceeded):
            memory.add(1, "four")
        memory.delete(1, memory.search(1, "one")[0].id)
        memory.add(1, "four")
        assert (memory.count(1), memory.count(2)) == (3, 3)


def test_one_store_per_file_and_one_embedder_per_file(tmp_path):
    path = tmp_path / "m.sqlite"
    memory = MemoryStore(path, bag_of_words)
    memory.add(1, "kept")
    with pytest.raises(Unavailable, match="another kernel is using this state dir"):
        MemoryStore(path, bag_of_words)
    memory.close()
    with pytest.raises(Unavailable, match="is closed"):
        memory.count(1)
    with pytest.raises(InvalidArgument, match="holds 32-dimensional embeddings but embed gives 8"):
        MemoryStore(path, lambda texts: bag_of_words(texts)[:, :8])
    with MemoryStore(path, bag_of_words) as reopened:
        assert [i.text for i in reopened.search(1, "kept")] == ["kept"]


def test_a_broken_embedder_is_reported_not_stored(tmp_path):
    answers = iter([np.ones((1, 4)), np.zeros((1, 4)), np.ones((2, 4))])
    with MemoryStore(tmp_path / "m.sqlite", lambda texts: next(answers)) as memory:
        with pytest.raises(InvalidArgument, match="zero or non-finite vector"):
            memory.add(1, "x")
        with pytest.raises(InvalidArgument, match=r"embed gave shape \(2, 4\) for 1 texts"):
            memory.add(1, "y")
        assert memory.count(1) == 0


def test_threads_adding_while_others_search(embedder, tmp_path):
    """The real embedder, called from several threads at once, as kernel workers would."""
    texts = [f"note {i}: {text}" for i, text in enumerate(MEMORIES.values())][:24]
    errors: list[BaseException] = []
    seen: list[list[MemoryItem]] = []

    def run(work) -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    with MemoryStore(tmp_path / "m.sqlite", embedder.embed) as memory:
        writers = [lambda part=texts[w::3]: [memory.add(7, t) for t in part] for w in range(3)]
        readers = [lambda: [seen.append(memory.search(7, q, k=5)) for q, _ in QUERIES[:8]]
                   for _ in range(2)]
        threads = [threading.Thread(target=run, args=(work,)) for work in writers + readers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert memory.count(7) == len(texts)
        assert sorted(i.text for i in memory.search(7, "note", k=MAX_K)) == sorted(texts)
    for results in seen:
        assert {i.text for i in results} <= set(texts)
        assert [i.score for i in results] == sorted((i.score for i in results), reverse=True)


WORDS = ["red", "green", "apple", "car", "tea", "sky", "blue", "river"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)
metadata = st.one_of(st.none(), st.fixed_dictionaries(
    {}, optional={"tag": st.sampled_from(["a", "b"]), "n": st.sampled_from([1, 1.0, True])}))
pids = st.sampled_from([1, 2, 3])


def same_json(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


class MemoryMachine(RuleBasedStateMachine):
    """Random adds, deletes, clears, searches and restarts against a dict per pid."""

    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-memory-"))
        self.memory = MemoryStore(self.dir / "m.sqlite", bag_of_words)
        self.model: dict[int, dict[str, MemoryItem]] = {1: {}, 2: {}, 3: {}}

    @rule(target=ids, pid=pids, text=texts, meta=metadata)
    def add(self, pid, text, meta):
        item = self.memory.add(pid, text, meta)
        assert (item.text, item.metadata, item.score) == (text, meta or {}, None)
        self.model[pid][item.id] = item
        return item.id

    @rule(pid=pids, batch=st.lists(st.tuples(texts, metadata), max_size=3))
    def add_many(self, pid, batch):
        for item in self.memory.add_many(pid, batch):
            self.model[pid][item.id] = item

    @rule(pid=pids, item_id=ids)
    def get(self, pid, item_id):
        if item_id in self.model[pid]:
            assert self.memory.get(pid, item_id) == self.model[pid][item_id]
        else:
            with pytest.raises(NotFound):
                self.memory.get(pid, item_id)

    @rule(pid=pids, item_id=ids)
    def delete(self, pid, item_id):
        if item_id in self.model[pid]:
            self.memory.delete(pid, item_id)
            del self.model[pid][item_id]
        else:
            with pytest.raises(NotFound):
                self.memory.delete(pid, item_id)

    @rule(pid=pids)
    def clear(self, pid):
        assert self.memory.clear(pid) == len(self.model[pid])
        self.model[pid].clear()

    @rule(pid=pids, query=texts, k=st.integers(1, 6),
          where=st.one_of(st.none(), st.dictionaries(st.sampled_from(["tag", "n"]),
                                                     st.sampled_from(["a", 1, 1.0, True]))))
    def search(self, pid, query, k, where):
        matching = [i for i in self.model[pid].values()
                    if all(key in i.metadata and same_json(i.metadata[key], value)
                           for key, value in (where or {}).items())]
        expected = sorted((cosine(query, i.text) for i in matching), reverse=True)[:k]
        found = self.memory.search(pid, query, k, where=where)
        assert [i.score for i in found] == pytest.approx(expected, abs=1e-5)
        assert len({i.id for i in found}) == len(found)
        for item in found:
            assert item.score == pytest.approx(cosine(query, item.text), abs=1e-5)
            assert item == MemoryItem(**vars(self.model[pid][item.id]) | {"score": item.score})

    @rule()
    def restart(self):
        self.memory.close()
        self.memory = MemoryStore(self.dir / "m.sqlite", bag_of_words)

    @invariant()
    def counts_agree(self):
        for pid, items in self.model.items():
            assert self.memory.count(pid) == len(items)

    def teardown(self):
        self.memory.close()
        shutil.rmtree(self.dir)


TestMemoryMachine = MemoryMachine.TestCase
TestMemoryMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
