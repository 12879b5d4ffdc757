import pytest

from wsrelay.core.topics import validate_topic, validate_topics
from wsrelay.errors import InvalidTopic, TooManyTopics


@pytest.mark.parametrize("name", ["a", "cats", "chat:room-1", "user/42", "x.y_z@host", "A" * 128])
def test_valid_names_pass_unchanged(name: str) -> None:
    """Letters, digits and _-.:/@ up to the length limit are accepted."""
    assert validate_topic(name, 128) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("A" * 129, "129 characters"),
        ("has space", "character outside"),
        ("star*", "character outside"),
        ("caf\u00e9", "character outside"),
        ("new\nline", "character outside"),
    ],
)
def test_invalid_names_are_refused_with_the_reason(name: str, fragment: str) -> None:
    """Each broken rule is named in the error."""
    with pytest.raises(InvalidTopic, match=fragment):
        validate_topic(name, 128)


def test_topic_count_limit_counts_distinct_names() -> None:
    """Duplicates count once; one name over the limit is refused."""
    assert validate_topics(["a", "a", "b"], 10, 2) == {"a", "b"}
    with pytest.raises(TooManyTopics):
        validate_topics(["a", "b", "c"], 10, 2)
