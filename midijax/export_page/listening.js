/*
 * Listening test page (inlined into index.html by midijax/export.py).
 *
 * Reads the study from the JSON in #study-data: blinded clip ids, their audio files,
 * continuation pairs, and the texts to show. Every text is put in the page with
 * textContent (never parsed as HTML). The order of clips, of pairs and of the two sides
 * of a pair is shuffled per rater with a PRNG seeded from the study id and the rater's
 * name, so a rater who reloads sees the same order and different raters see different
 * orders. Answers are kept in localStorage (per study and rater) until the rater
 * downloads them as CSV.
 */
(function () {
  'use strict';

  const data = JSON.parse(document.getElementById('study-data').textContent);
  const STORE = 'midijax-listening:' + data.study_id + ':';
  const CSV_COLUMNS = ['study_id', 'rater', 'item', 'clip_id', 'rating', 'pair_id',
                       'preferred_clip_id', 'other_clip_id', 'position', 'played_s',
                       'timestamp'];
  const app = document.getElementById('app');
  const memory = {};  // stands in for localStorage where a browser refuses it
  let storageOk = true;

  // ---------------------------------------------------------------- storage
  function load(key, fallback) {
    try {
      const text = window.localStorage.getItem(STORE + key);
      return text === null ? fallback : JSON.parse(text);
    } catch (e) {
      storageOk = false;
      return key in memory ? memory[key] : fallback;
    }
  }

  function save(key, value) {
    memory[key] = value;
    try {
      window.localStorage.setItem(STORE + key, JSON.stringify(value));
    } catch (e) {
      storageOk = false;
    }
  }

  // ---------------------------------------------------------------- seeded order
  // cyrb53-style string hash -> 32-bit seed; mulberry32 PRNG; Fisher-Yates shuffle.
  function hashString(text) {
    let h1 = 0xdeadbeef;
    let h2 = 0x41c6ce57;
    for (let i = 0; i < text.length; i++) {
      const ch = text.charCodeAt(i);
      h1 = Math.imul(h1 ^ ch, 2654435761);
      h2 = Math.imul(h2 ^ ch, 1597334677);
    }
    h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
    return h1 >>> 0;
  }

  function mulberry32(seed) {
    let a = seed >>> 0;
    return function () {
      a = (a + 0x6d2b79f5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  function shuffled(items, rand) {
    const out = items.slice();
    for (let i = out.length - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      const tmp = out[i];
      out[i] = out[j];
      out[j] = tmp;
    }
    return out;
  }

  function randomRaterName() {
    const bytes = new Uint8Array(4);
    window.crypto.getRandomValues(bytes);
    return 'anon-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // ---------------------------------------------------------------- DOM helpers
  // Builds an element; `text` goes through textContent, other props are attributes.
  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.keys(props || {}).forEach((k) => {
      if (k === 'text') {
        node.textContent = props[k];
      } else if (k === 'className') {
        node.className = props[k];
      } else {
        node.setAttribute(k, props[k]);
      }
    });
    (children || []).forEach((c) => { if (c) node.appendChild(c); });
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  const byId = {};
  data.clips.concat(data.prompts).forEach((c) => { byId[c.id] = c; });

  // ---------------------------------------------------------------- state
  let rater = null;
  let answers = null;  // {ratings: {clipId: {...}}, prefs: {pairId: {...}}, played: {clipId: s}}
  let order = null;    // {clips: [ids], pairs: [{id, prompt, a, b}]}

  function answersKey() { return 'rater:' + rater; }

  function persist() { save(answersKey(), answers); }

  function audioPlayer(clipId) {
    const clip = byId[clipId];
    const audio = el('audio', {controls: '', preload: 'metadata', 'data-clip-id': clipId});
    clip.audio.forEach((s) => audio.appendChild(el('source', {src: s.src, type: s.type})));
    audio.addEventListener('play', () => {
      // One clip at a time.
      document.querySelectorAll('audio').forEach((other) => {
        if (other !== audio) other.pause();
      });
    });
    audio.addEventListener('timeupdate', () => {
      const prev = answers.played[clipId] || 0;
      if (audio.currentTime > prev) answers.played[clipId] = audio.currentTime;
    });
    audio.addEventListener('pause', persist);
    audio.addEventListener('ended', persist);
    return audio;
  }

  function countAnswered() {
    const r = order.clips.filter((id) => answers.ratings[id]).length;
    const p = order.pairs.filter((pr) => answers.prefs[pr.id]).length;
    return r + p;
  }

  function updateProgress() {
    const total = order.clips.length + order.pairs.length;
    const node = document.getElementById('progress');
    node.textContent = countAnswered() + ' of ' + total + ' answered';
  }

  // ---------------------------------------------------------------- CSV
  function csvCell(value) {
    const text = value === undefined || value === null ? '' : String(value);
    return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function buildCsv() {
    const rows = [CSV_COLUMNS];
    order.clips.forEach((id, i) => {
      const a = answers.ratings[id];
      if (!a) return;
      rows.push([data.study_id, rater, 'rating', id, a.rating, '', '', '', i + 1,
                 (answers.played[id] || 0).toFixed(2), a.timestamp]);
    });
    order.pairs.forEach((pair, i) => {
      const a = answers.prefs[pair.id];
      if (!a) return;
      rows.push([data.study_id, rater, 'preference', '', '', pair.id, a.preferred, a.other,
                 i + 1, '', a.timestamp]);
    });
    return rows.map((r) => r.map(csvCell).join(',')).join('\r\n') + '\r\n';
  }

  function download() {
    persist();
    const blob = new Blob([buildCsv()], {type: 'text/csv;charset=utf-8'});
    const url = URL.createObjectURL(blob);
    const safe = rater.replace(/[^A-Za-z0-9_-]+/g, '_').slice(0, 40) || 'rater';
    const link = el('a', {href: url, download: 'listening_' + data.study_id + '_' + safe + '.csv'});
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    document.getElementById('download-status').textContent =
        'Downloaded ' + countAnswered() + ' answers. Send the CSV file back.';
  }

  // ---------------------------------------------------------------- views
  function ratingItem(clipId, index) {
    const clip = byId[clipId];
    const name = 'rating-' + clipId;
    const scale = el('div', {className: 'scale', role: 'radiogroup'});
    data.rating_labels.forEach((label, k) => {
      const value = String(k + 1);
      const input = el('input', {type: 'radio', name: name, value: value,
                                 id: name + '-' + value});
      if (answers.ratings[clipId] && String(answers.ratings[clipId].rating) === value) {
        input.checked = true;
      }
      input.addEventListener('change', () => {
        answers.ratings[clipId] = {rating: k + 1, timestamp: new Date().toISOString()};
        persist();
        updateProgress();
      });
      scale.appendChild(el('label', {for: input.id}, [input,
          el('span', {text: value + ' ' + label})]));
    });
    return el('section', {className: 'item', id: 'item-' + clipId, 'data-clip-id': clipId}, [
      el('h3', {text: 'Clip ' + (index + 1)}),
      clip.display ? el('p', {className: 'display', text: clip.display}) : null,
      audioPlayer(clipId),
      scale,
    ]);
  }

  function pairItem(pair, index) {
    const name = 'pref-' + pair.id;
    const prompt = byId[pair.prompt];
    const choice = el('div', {className: 'scale', role: 'radiogroup'});
    [['A', pair.a, pair.b], ['B', pair.b, pair.a]].forEach(([side, clipId, other]) => {
      const input = el('input', {type: 'radio', name: name, value: clipId,
                                 id: name + '-' + side});
      if (answers.prefs[pair.id] && answers.prefs[pair.id].preferred === clipId) {
        input.checked = true;
      }
      input.addEventListener('change', () => {
        answers.prefs[pair.id] = {preferred: clipId, other: other,
                                  timestamp: new Date().toISOString()};
        persist();
        updateProgress();
      });
      choice.appendChild(el('label', {for: input.id}, [input,
          el('span', {text: side + ' fits better'})]));
    });
    const side = (label, clipId) => el('div', {className: 'side'}, [
      el('h4', {text: label}),
      byId[clipId].display ? el('p', {className: 'display', text: byId[clipId].display}) : null,
      audioPlayer(clipId),
    ]);
    return el('section', {className: 'item pair', id: 'pair-' + pair.id,
                          'data-pair-id': pair.id}, [
      el('h3', {text: 'Pair ' + (index + 1)}),
      side('Prompt', prompt.id),
      side('Continuation A', pair.a),
      side('Continuation B', pair.b),
      choice,
    ]);
  }

  function showTest() {
    clear(app);
    const rand = mulberry32(hashString(data.study_id + '\u0000' + rater));
    order = {
      clips: shuffled(data.clips.map((c) => c.id), rand),
      pairs: shuffled(data.pairs, rand).map((p) => {
        const flip = rand() < 0.5;
        return {id: p.id, prompt: p.prompt, a: p.clips[flip ? 1 : 0], b: p.clips[flip ? 0 : 1]};
      }),
    };
    answers = load(answersKey(), null) || {ratings: {}, prefs: {}, played: {}};
    answers.played = answers.played || {};

    const header = el('header', {}, [
      el('h1', {text: data.title}),
      el('p', {className: 'rater'}, [el('span', {text: 'Rater: '}),
                                     el('strong', {id: 'rater-label', text: rater})]),
      el('p', {id: 'progress', 'aria-live': 'polite'}),
      storageOk ? null : el('p', {className: 'warning',
          text: 'This browser does not keep answers across reloads: download before closing.'}),
    ]);
    const ratings = el('div', {id: 'ratings'}, order.clips.map(ratingItem));
    const pairs = el('div', {id: 'pairs'}, order.pairs.map(pairItem));
    const downloadButton = el('button', {id: 'download', type: 'button',
                                         text: 'Download answers (CSV)'});
    downloadButton.addEventListener('click', download);
    const switchButton = el('button', {id: 'switch-rater', type: 'button',
                                       text: 'Change rater'});
    switchButton.addEventListener('click', () => { persist(); showStart(); });
    app.appendChild(header);
    app.appendChild(el('p', {className: 'instructions', text: data.instructions}));
    if (order.clips.length) {
      app.appendChild(el('h2', {text: data.question}));
      app.appendChild(ratings);
    }
    if (order.pairs.length) {
      app.appendChild(el('h2', {text: data.pair_question}));
      app.appendChild(pairs);
    }
    app.appendChild(el('footer', {}, [
      downloadButton, switchButton,
      el('p', {id: 'download-status', 'aria-live': 'polite'}),
    ]));
    updateProgress();
  }

  function showStart() {
    clear(app);
    document.title = data.title;
    const input = el('input', {id: 'rater-name', type: 'text', autocomplete: 'off',
                               maxlength: '80'});
    input.value = load('last-rater', '') || '';
    const start = el('button', {id: 'start', type: 'submit', text: 'Start'});
    const form = el('form', {id: 'start-form'}, [
      el('label', {for: 'rater-name', text: 'Your name or rater code (leave empty for a random one): '}),
      input, start,
    ]);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      rater = input.value.trim() || randomRaterName();
      save('last-rater', rater);
      showTest();
    });
    app.appendChild(el('h1', {text: data.title}));
    app.appendChild(el('p', {className: 'instructions', text: data.instructions}));
    const count = (n, word) => n + ' ' + word + (n === 1 ? '' : 's');
    app.appendChild(el('p', {text: count(data.clips.length, 'clip') + ' to rate, ' +
                                   count(data.pairs.length, 'pair') + ' to compare, ' +
                                   data.seconds + ' s each.'}));
    app.appendChild(form);
  }

  showStart();
})();
