from python_backend.features.keys import entity_key


def test_default_prefix() -> None:
    assert entity_key("user", "u_000123") == "features:user:u_000123"


def test_custom_prefix_and_entity_type() -> None:
    assert entity_key("merchant", "m_42", prefix="staging") == "staging:merchant:m_42"


def test_keys_of_different_entity_types_never_collide() -> None:
    assert entity_key("user", "1") != entity_key("merchant", "1")
