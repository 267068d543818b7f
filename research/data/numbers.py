"""A synthetic translation task for encoder-decoder models: numbers below a million written with
digits, to the same numbers in English words.

  '4 0 7 3 5 8' -> 'four hundred seven thousand three hundred fifty eight'

The mapping has real structure (place values, the teens, 'thousand' splitting two groups of three
digits) and every answer is checkable exactly. Numbers are drawn with a uniform number of digits
(1 to 6), and a number is held out when a hash of it says so, so no held-out number is ever trained
on, whatever the seed or the count drawn.
"""

import zlib

import numpy as np

HELD_OUT_FRACTION = 0.05
MAX_DIGITS = 6
ONES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten',
        'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen', 'sixteen', 'seventeen', 'eighteen',
        'nineteen')
TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy', 'eighty', 'ninety')


def _below_thousand(n: int) -> list[str]:
  hundreds, rest = divmod(n, 100)
  words = [ONES[hundreds], 'hundred'] if hundreds else []
  if rest >= 20:
    words += [TENS[rest // 10]] + ([ONES[rest % 10]] if rest % 10 else [])
  elif rest:
    words.append(ONES[rest])
  return words


def in_words(n: int) -> str:
  """0 <= n < 10**6 in English words (no 'and', no hyphens): 'one thousand twenty one'."""
  if not 0 <= n < 10**MAX_DIGITS:
    raise ValueError(f'{n} is outside [0, {10**MAX_DIGITS})')
  if n == 0:
    return ONES[0]
  thousands, rest = divmod(n, 1000)
  words = _below_thousand(thousands) + ['thousand'] if thousands else []
  return ' '.join(words + _below_thousand(rest))


def in_digits(n: int) -> str:
  """The digits of n separated by spaces ('4 0 7'), so that a word tokenizer sees each digit."""
  return ' '.join(str(n))


def is_held_out(n: int) -> bool:
  return zlib.crc32(str(n).encode()) / 2**32 < HELD_OUT_FRACTION


def draw_numbers(split: str, count: int, rng: np.random.Generator) -> list[int]:
  """`count` numbers of `split` ('train' or 'held_out'): digit counts uniform in 1..MAX_DIGITS."""
  out = []
  while len(out) < count:
    digits = int(rng.integers(1, MAX_DIGITS + 1))
    n = int(rng.integers(0 if digits == 1 else 10**(digits - 1), 10**digits))
    if is_held_out(n) == (split == 'held_out'):
      out.append(n)
  return out


def pairs(numbers: list[int]) -> list[tuple[str, str]]:
  """(source, target) texts of each number."""
  return [(in_digits(n), in_words(n)) for n in numbers]
