"""Identifiers and keys: the alphabet, the length, and that every position is random."""

from collections import Counter

from presence.keys import KEY_LENGTH, hash_key, key_matches, new_id, new_key


def test_ids_are_letters_and_digits_of_the_asked_length_and_never_repeat():
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 22 and i.isascii() and i.isalnum() for i in ids)
    assert len(new_id(40)) == 40


def test_every_position_of_an_id_uses_the_whole_alphabet_evenly():
    ids = [new_id() for _ in range(20_000)]
    for position in (0, 11, 21):
        counts = Counter(i[position] for i in ids)
        assert len(counts) == 62
        # 20,000 / 62 = 322 expected per character; a fixed or biased digit falls far outside this
        assert 200 < min(counts.values()) and max(counts.values()) < 460


def test_keys_are_long_and_match_only_their_hash():
    key = new_key()
    assert len(key) == KEY_LENGTH
    assert key_matches(key, hash_key(key))
    assert not key_matches(key[:-1] + ("A" if key[-1] != "A" else "B"), hash_key(key))
    assert not key_matches(key, None)
