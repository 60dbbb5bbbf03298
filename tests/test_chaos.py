"""tools/chaos.py's verdict: the summary line and the exit status (the campaigns themselves are
exercised by tests/test_resume.py and tests/test_hostile_input.py)."""
from tools import chaos

KILLS = dict(kills=5, kills_survived=5, resumes_bit_identical=True, max_abs_diff=0.0,
             compared=['a', 'b'])
FILES = dict(files_tried=62, rejected_with_clear_error=22, colorized=40, wrong=0, crashes=0)


def test_summary_names_every_figure():
  line = chaos.summary(KILLS, FILES)
  for text in ('kills survived 5/5', 'bit-identical yes', 'files tried 62',
               'rejected with a clear error 22', 'colorized 40', 'crashes 0'):
    assert text in line
  assert chaos.passed(KILLS, FILES)


def test_any_failure_fails_the_campaign():
  assert not chaos.passed(dict(KILLS, kills_survived=4), FILES)
  assert not chaos.passed(dict(KILLS, resumes_bit_identical=False), FILES)
  assert not chaos.passed(KILLS, dict(FILES, crashes=1))
  assert not chaos.passed(KILLS, dict(FILES, wrong=1))
  assert 'bit-identical NO' in chaos.summary(dict(KILLS, resumes_bit_identical=False), None)
  assert chaos.passed(None, FILES) and chaos.passed(KILLS, None)
