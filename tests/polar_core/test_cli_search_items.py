"""`search --skip`: chunks of a large search never overlap and add up to the one-go sample."""
from polar_core.cli import search_items
from polar_core.study import tasks


def test_chunks_partition_the_sample():
    families = ["capitals", "plurals"]
    first = search_items(families, 2, "train")
    second = search_items(families, 3, "train", skip=2)
    whole = search_items(families, 5, "train")
    assert not {it.id for it in first} & {it.id for it in second}
    for family in families:
        ids = [it.id for it in first + second if it.family == family]
        assert ids == [it.id for it in whole if it.family == family]
    assert [it.id for it in first] == [it.id for f in families for it in tasks.sample_items(f, 2, "train")]


def test_all_after_skip():
    rest = search_items(["capitals"], None, "val", skip=3)
    assert [it.id for it in rest] == [it.id for it in tasks.sample_items("capitals", None, "val")[3:]]
