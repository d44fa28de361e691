"""Shapes of the tiny random-weight models the tests build (nothing is downloaded)."""

VOCAB = 300

# A Llama-family decoder small enough to run in milliseconds; hidden and FFN sizes are multiples
# of the I2_S block (128) so every projection packs without padding.
TINY_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
