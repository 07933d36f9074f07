"""Tests for midijax.export: rendering, loudness matching, blinding, page safety, results."""
import csv
import json
import math
import os
import pathlib
import re
import shutil
import wave

import mido
import numpy as np
import pytest

from conftest import IN_CI
from midijax import export
from midijax.notes import Notes

SECONDS = 2.5
XSS = "<script>alert(1)</script>"
REAL_FILE = "/data/piano/maestro/2018/secret_piece_take3.midi"
CONDITIONS = ("zzcond_groove_model", "zzcond_piano_real", "zzcond_piano_model")


def require_fluidsynth():
  missing = [what for what, ok in (("fluidsynth", shutil.which("fluidsynth")),
                                   (export.DEFAULT_SOUNDFONT,
                                    os.path.exists(export.DEFAULT_SOUNDFONT))) if not ok]
  if missing:
    msg = f"missing {missing} (Debian packages fluidsynth, fluid-soundfont-gm)"
    if IN_CI:
      pytest.fail("CI=true but " + msg)
    pytest.skip(msg)


def drum_groove(bars=2, qpm=120.0) -> Notes:
  """Kick on beats 1 and 3, snare on 2 and 4, closed hi-hat on every 8th."""
  eighth = 60.0 / qpm / 2
  hats = np.arange(8 * bars) * eighth
  kicks = np.arange(0, 8 * bars, 4) * eighth
  snares = kicks + 2 * eighth
  start = np.concatenate([hats, kicks, snares])
  pitch = [42] * len(hats) + [36] * len(kicks) + [38] * len(snares)
  velocity = [70] * len(hats) + [110] * len(kicks) + [100] * len(snares)
  return Notes.from_arrays(pitch, start, start + 0.1, velocity, is_drum=True, qpm=qpm)


def piano_phrase(transpose=0, velocity=60) -> Notes:
  pitches = np.array([60, 64, 67, 72, 71, 67, 62, 59]) + transpose
  start = np.arange(8) * 0.375
  return Notes.from_arrays(pitches, start, start + 0.7, velocity)


def make_clips():
  # Loudness differs on purpose (velocity 30 vs 110 pianos, drums) so matching is tested.
  return [
      export.Clip(CONDITIONS[0], drum_groove(), {"checkpoint": "ckpt_000777", "seed": 3}),
      export.Clip(CONDITIONS[1], piano_phrase(velocity=110).to_note_sequence(),
                  {"real_file": REAL_FILE}, display=XSS),
      export.Clip(CONDITIONS[2], piano_phrase(5, velocity=30), {"checkpoint": "ckpt_000777"}),
      export.Clip(CONDITIONS[1], piano_phrase(-12), {"real_file": REAL_FILE},
                  pair_group="zzgroup_prompt_one", role="prompt"),
      export.Clip(CONDITIONS[2], piano_phrase(-10), {}, pair_group="zzgroup_prompt_one",
                  role="continuation"),
      export.Clip(CONDITIONS[1], piano_phrase(-7), {"real_file": REAL_FILE},
                  pair_group="zzgroup_prompt_one", role="continuation"),
  ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  require_fluidsynth()
  out = tmp_path_factory.mktemp("listening")
  manifest = export.export_listening(make_clips(), out, SECONDS, seed=7,
                                     settings={"title": "Study " + XSS})
  return out, manifest


def key_rows(out):
  with open(out / "key.csv", newline="") as f:
    return list(csv.DictReader(f))


def page_data(html: str) -> dict:
  m = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', html, re.S)
  return json.loads(m.group(1))


# ------------------------------------------------------------------ audio

def test_wavs_have_the_clip_length_and_sound(exported):
  out, manifest = exported
  rows = [r for r in key_rows(out) if r["kind"] == "clip"]
  assert len(rows) == 6
  sr = manifest["audio"]["sample_rate"]
  for r in rows:
    with wave.open(str(out / r["audio"])) as w:
      assert w.getnchannels() == 2 and w.getsampwidth() == 2 and w.getframerate() == sr
      assert w.getnframes() == round(SECONDS * sr)
    audio, _ = export.read_wav(out / r["audio"])
    rms = float(np.sqrt(np.mean(audio ** 2)))
    assert rms > 0.01, r["id"]
    assert np.max(np.abs(audio)) <= 10 ** (-1 / 20) + 1e-3  # peak limit holds
  assert manifest["audio"]["silent_clips"] == []


def test_loudness_is_equal_across_conditions(exported):
  out, manifest = exported
  rows = [r for r in key_rows(out) if r["kind"] == "clip"]
  loud = {r["id"]: export.gated_loudness_dbfs(export.read_wav(out / r["audio"])[0], 44100)
          for r in rows}
  assert max(loud.values()) - min(loud.values()) < 0.5, loud
  assert all(abs(v - manifest["audio"]["loudness_dbfs"]) < 0.3 for v in loud.values())
  # The renders were not equally loud to begin with.
  gains = [float(r["gain_db"]) for r in rows]
  assert max(gains) - min(gains) > 3


def test_drums_are_on_the_gm_drum_channel(exported):
  out, _ = exported
  drum_row = next(r for r in key_rows(out) if r["condition"] == CONDITIONS[0])
  piano_row = next(r for r in key_rows(out) if r["condition"] == CONDITIONS[1])
  channels = lambda path: {m.channel for t in mido.MidiFile(path).tracks for m in t
                           if m.type == "note_on"}
  assert channels(out / drum_row["midi"]) == {9}
  assert 9 not in channels(out / piano_row["midi"])
  # Cut to SECONDS: nothing starts at or after the cut.
  import note_seq  # pylint: disable=g-import-not-at-top  # slow import, only needed here
  notes = Notes.from_note_sequence(note_seq.midi_file_to_note_sequence(
      str(out / drum_row["midi"])))
  assert notes.start.max() < SECONDS and notes.end.max() <= SECONDS + 1e-3
  assert notes.is_drum.all()


def test_compressed_copy_when_an_encoder_exists(exported):
  out, manifest = exported
  enc = manifest["audio"]["encoder"]
  data = json.loads((out / "rater" / "clips.json").read_text())
  for item in data["clips"] + data["prompts"]:
    assert item["audio"][-1]["type"] == "audio/wav"
    for src in item["audio"]:
      assert (out / "rater" / src["src"]).stat().st_size > 1000
    assert len(item["audio"]) == (2 if enc else 1)
  if export.find_encoder() is None:
    assert enc is None


# ------------------------------------------------------------------ blinding and safety

def test_rater_files_reveal_no_condition(exported):
  out, _ = exported
  rater = out / "rater"
  shipped = sorted(str(p.relative_to(rater)) for p in rater.rglob("*") if p.is_file())
  assert "index.html" in shipped and "clips.json" in shipped
  assert all(p in ("index.html", "clips.json") or re.fullmatch(r"audio/c[0-9a-f]{10}\.\w+", p)
             for p in shipped), shipped
  assert not list(rater.rglob("key.csv")) and not list(rater.rglob("manifest.json"))
  secrets_ = list(CONDITIONS) + ["zzgroup_prompt_one", REAL_FILE,
                                 os.path.basename(REAL_FILE), "ckpt_000777", "key.csv"]
  for name in ("index.html", "clips.json"):
    text = (rater / name).read_text()
    for s in secrets_:
      assert s not in text, (name, s)
  # Every rated id is in the key; order in the page data is by id, not by condition.
  data = json.loads((rater / "clips.json").read_text())
  ids = [c["id"] for c in data["clips"]]
  assert ids == sorted(ids)
  key_ids = {r["id"] for r in key_rows(out)}
  assert set(ids) <= key_ids and {p["id"] for p in data["pairs"]} <= key_ids
  assert len(data["pairs"]) == 1 and len(data["prompts"]) == 1


def test_key_holds_conditions_roles_and_meta(exported):
  out, manifest = exported
  rows = key_rows(out)
  clips = [r for r in rows if r["kind"] == "clip"]
  assert [r["condition"] for r in clips] == [c.condition for c in make_clips()]
  assert [r["role"] for r in clips] == ["single"] * 3 + ["prompt"] + ["continuation"] * 2
  assert clips[1]["meta_real_file"] == REAL_FILE and clips[0]["meta_checkpoint"] == "ckpt_000777"
  prompt_id = clips[3]["id"]
  assert clips[4]["prompt_id"] == prompt_id == clips[5]["prompt_id"]
  (pair,) = [r for r in rows if r["kind"] == "pair"]
  assert pair["members"].split() == [clips[4]["id"], clips[5]["id"]]
  assert (out / clips[0]["midi"]).exists()
  assert (out / "pianoroll" / f"{clips[0]['id']}.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((out / "manifest.json").read_text())["counts"] == manifest["counts"]
  assert manifest["counts"] == {"clips": 6, "rated": 5, "prompts": 1, "pairs": 1,
                                "conditions": sorted(CONDITIONS)}


def test_script_in_metadata_is_data_not_markup(exported):
  out, _ = exported
  html = (out / "rater" / "index.html").read_text()
  assert "<script>alert" not in html and "alert(1)</script>" not in html
  data = page_data(html)
  assert data["title"] == "Study " + XSS
  assert XSS in [c["display"] for c in data["clips"]]
  # Only the page's own two script elements exist; the CSP pins the code by hash.
  assert html.count("<script") == 2
  assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", html)
  js = (export.PAGE_DIR / "listening.js").read_text()
  assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


def test_shown_text_naming_a_condition_is_refused(tmp_path):
  clips = make_clips()[:2]
  clips[0].display = f"made by {CONDITIONS[0]}"
  with pytest.raises(ValueError, match="reveal"):
    export.export_listening(clips, tmp_path, SECONDS, seed=1)
  with pytest.raises(ValueError, match="reveal"):
    export.export_listening(make_clips()[:2], tmp_path, SECONDS, seed=1,
                            settings={"instructions": "from " + os.path.basename(REAL_FILE)})
  with pytest.raises(ValueError, match="pair_group"):
    export.export_listening([export.Clip("a", piano_phrase(), role="continuation")],
                            tmp_path, SECONDS)
  assert not (tmp_path / "rater").exists()


def test_cut_notes_clips_to_the_window():
  n = Notes.from_arrays([60, 62, 64], [0.0, 1.5, 3.0], [2.0, 2.5, 3.5])
  cut = export.cut_notes(n, 2.0)
  assert cut.tuples() == [(60, 100, 0.0, 2.0, 0, False), (62, 100, 1.5, 2.0, 0, False)]


# ------------------------------------------------------------------ results

# The 97.5% Student t quantiles the hand-written t distribution gave before scipy.stats
# replaced it (bisection on a continued-fraction incomplete beta).
HAND_WRITTEN_T_975 = {1: 12.70620473617451, 3: 3.1824463052834706, 9: 2.2621571627981507,
                      30: 2.0422724563010086}


def test_student_t_quantiles():
  # Reference values from standard t tables, through the interval of the mean: n = df + 1
  # ratings, half-width = t(0.975, df) * std / sqrt(n).
  for df, q in ((1, 12.706204736), (3, 3.182446305), (9, 2.262157163), (30, 2.042272456)):
    m = export.mean_ci(np.arange(df + 1.0))
    t = m["ci95"] * math.sqrt(m["n"]) / m["std"]
    assert t == pytest.approx(q, abs=1e-6)
    assert abs(t - HAND_WRITTEN_T_975[df]) < 1e-12


def test_wilson_and_sign_test_match_the_hand_written_versions():
  # Numbers of the hand-written Wilson interval and exact binomial sum they replace.
  assert export.proportion_ci(1, 4) == pytest.approx(
      (0.04558726080970055, 0.6993581574175981), abs=1e-12)
  assert export.proportion_ci(3, 10) == pytest.approx(
      (0.10779126740630099, 0.6032218525388546), abs=1e-12)
  assert export.sign_test(1, 4) == 0.625 and export.sign_test(3, 10) == 0.34375
  assert all(math.isnan(v) for v in (*export.proportion_ci(0, 0), export.sign_test(0, 0)))


KEY_CSV = """id,kind,condition,role,pair_group,prompt_id,members
cA1,clip,modelA,single,,,
cA2,clip,modelA,continuation,g,cP,
cB1,clip,real,single,,,
cB2,clip,real,continuation,g,cP,
cP,clip,real,prompt,g,,
cA3,clip,modelA,continuation,g,cP,
pp1,pair,,,g,cP,cA2 cB2
pp2,pair,,,g,cP,cA2 cA3
"""
HEADER = ("study_id,rater,item,clip_id,rating,pair_id,preferred_clip_id,other_clip_id,"
          "position,played_s,timestamp\n")


def test_listening_results_known_numbers(tmp_path):
  (tmp_path / "key.csv").write_text(KEY_CSV)
  r1 = tmp_path / "r1.csv"
  r1.write_text(HEADER + "\n".join([
      "s1,ann,rating,cA1,4,,,,1,2.5,2026-01-01T10:00:00Z",
      "s1,ann,rating,cA2,5,,,,2,2.5,2026-01-01T10:01:00Z",
      "s1,ann,rating,cB1,2,,,,3,2.5,2026-01-01T10:02:00Z",
      "s1,ann,preference,,,pp1,cB2,cA2,1,,2026-01-01T10:03:00Z",
      "s1,ann,preference,,,pp2,cA2,cA3,2,,2026-01-01T10:03:00Z",
  ]) + "\n")
  r2 = tmp_path / "r2.csv"
  r2.write_text(HEADER + "\n".join([
      '"s1","bob, jr.",rating,cA1,3,,,,1,2.5,2026-01-01T11:00:00Z',
      '"s1","bob, jr.",rating,cA2,1,,,,2,2.5,2026-01-01T11:00:30Z',
      # Bob changed his mind: the later answer for cA2 counts.
      '"s1","bob, jr.",rating,cA2,4,,,,2,2.5,2026-01-01T11:01:00Z',
      '"s1","bob, jr.",rating,cB1,3,,,,3,2.5,2026-01-01T11:02:00Z',
      '"s1","bob, jr.",rating,cZZ,5,,,,4,2.5,2026-01-01T11:02:00Z',
      '"s1","bob, jr.",preference,,,pp1,cB2,cA2,1,,2026-01-01T11:03:00Z',
  ]) + "\n")
  r3 = tmp_path / "r3.csv"
  r3.write_text(HEADER + "s1,cy,preference,,,pp1,cA2,cB2,1,,2026-01-02T09:00:00Z\n"
                "s1,dee,preference,,,pp1,cB2,cA2,1,,2026-01-02T09:00:00Z\n"
                # Not a pair of this study, and a pair answered with the wrong clips.
                "s1,cy,preference,,,pXX,cB2,cA3,2,,2026-01-02T09:00:00Z\n"
                "s1,cy,preference,,,pp2,cB2,cA3,3,,2026-01-02T09:00:00Z\n")
  res = export.listening_results([r1, r2, r3], tmp_path / "key.csv",
                                 plot_path=tmp_path / "results.png")
  assert res["n_raters"] == 4 and res["n_ratings"] == 6 and res["n_preferences"] == 5
  assert res["unknown_ids"] == ["cZZ", "pXX"] and res["mismatched_pairs"] == 1
  a = res["mos"]["modelA"]  # ratings 4, 5, 3, 4
  assert (a["n"], a["raters"]) == (4, 2)
  assert a["mean"] == pytest.approx(4.0)
  assert a["std"] == pytest.approx(math.sqrt(2 / 3))
  assert a["ci95"] == pytest.approx(3.182446305 * math.sqrt(2 / 3) / 2, rel=1e-6)
  assert (a["ci95_low"], a["ci95_high"]) == pytest.approx((4 - a["ci95"], 4 + a["ci95"]))
  b = res["mos"]["real"]  # ratings 2, 3
  assert b["mean"] == pytest.approx(2.5)
  assert b["ci95"] == pytest.approx(12.706204736 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
  (p,) = res["preferences"].values()  # modelA vs real: real won 3 of 4
  assert (p["a"], p["b"], p["a_wins"], p["b_wins"], p["n"]) == ("modelA", "real", 1, 3, 4)
  assert p["a_rate"] == pytest.approx(0.25)
  assert p["p_value"] == pytest.approx(0.625)  # 2 * (1 + 4) / 16
  assert p["ci95_low"] < 0.25 < p["ci95_high"]
  assert res["same_condition_pairs"] == 1
  assert pathlib.Path(res["plot"]).read_bytes()[:4] == b"\x89PNG"
  text = export.format_listening_results(res)
  assert "modelA over real" in text and "4.00" in text and "cZZ" in text


def test_find_encoder_prefers_mp3_and_falls_back(tmp_path, monkeypatch):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  monkeypatch.setenv("PATH", str(bin_dir))
  assert export.find_encoder() is None  # nothing installed: WAV only
  tool = bin_dir / "oggenc"
  tool.write_text("#!/bin/sh\nexit 0\n")
  tool.chmod(0o755)
  enc = export.find_encoder()
  assert (enc.name, enc.tool, enc.mime) == ("ogg", "oggenc", "audio/ogg")
  assert enc.argv("in.wav", "out.ogg") == ["oggenc", "-Q", "-q", "4", "-o", "out.ogg", "in.wav"]
  (bin_dir / "lame").write_text("#!/bin/sh\nexit 0\n")
  (bin_dir / "lame").chmod(0o755)
  assert export.find_encoder().tool == "lame"
  assert export.find_encoder(("ogg",)).tool == "oggenc"
