// gpt2lab inspect: draws the page's inline `data` (one view); hovering writes values into #info.
const info = document.getElementById("info"), view = document.getElementById("view");
const show = (text) => { info.textContent = text; };
const esc = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");
const labels = data.tokens.map((t, i) => `${t} ${data.start + i}`);
const layerName = (l) => (l === 0 ? "embed" : `block ${l - 1}`);

function colour(v, hue) {
  return `hsl(${hue}, 70%, ${100 - 55 * Math.max(0, Math.min(1, v))}%)`;
}

// a table of coloured cells (values in 0..1); hovering a cell shows cellText(row, column)
function matrix(rows, cellText, hue, colLabels, rowLabels) {
  const t = document.createElement("table");
  const head = colLabels.map((c) => `<th class="col">${esc(c)}</th>`).join("");
  const body = rows.map((row, i) => {
    const cells = row.map((v, j) =>
      `<td data-i="${i}" data-j="${j}" style="background:${colour(v, hue)}"></td>`);
    return `<tr><th>${esc(rowLabels[i])}</th>${cells.join("")}</tr>`;
  });
  t.innerHTML = `<tr><th></th>${head}</tr>${body.join("")}`;
  t.onmouseover = (e) => {
    const d = e.target.dataset;
    if (d.i !== undefined) show(cellText(+d.i, +d.j));
  };
  return t;
}

const renderers = {
  attention() {
    const sel = document.createElement("select");
    const first = data.layer === null ? 0 : data.layer;
    data.attention.forEach((heads, l) => heads.forEach((_, h) => {
      const head = data.head === null ? h : data.head;
      sel.add(new Option(`layer ${first + l} head ${head}`, `${l},${h}`));
    }));
    (data.mean || []).forEach((_, l) => sel.add(new Option(`layer ${l} mean`, `${l},mean`)));
    const draw = () => {
      const [l, h] = sel.value.split(",");
      const rows = h === "mean" ? data.mean[+l] : data.attention[+l][+h];
      const text = (i, j) => (j > i ? "" :
        `query ${labels[i]} -> key ${labels[j]}: p = ${rows[i][j].toFixed(4)}`);
      view.replaceChildren(matrix(rows, text, 215, labels, labels));
    };
    sel.onchange = draw;
    document.getElementById("controls").append("show: ", sel);
    draw();
  },
  next() {
    const k = data.top_probs[0].length;
    const ranks = [...Array(k).keys()].map((j) => `#${j + 1}`);
    const text = (i, j) => `after ${labels[i]}: ${data.top_tokens[i][j]} ` +
      `(id ${data.top_ids[i][j]}) p = ${data.top_probs[i][j].toFixed(4)}` +
      (i < data.actual_rank.length ? `; came next: ${data.tokens[i + 1]}, ` +
        `rank #${data.actual_rank[i]}, p = ${data.actual_prob[i].toFixed(4)}` : "");
    const t = matrix(data.top_probs, text, 130, ranks, labels);
    t.querySelectorAll("td").forEach((td) => {
      td.className = "wide";
      td.textContent = data.top_tokens[+td.dataset.i][+td.dataset.j];
    });
    view.replaceChildren(t);
  },
  surprise() {
    const top = Math.max(...data.bits.filter((b) => b !== null), 1e-9);
    document.getElementById("controls").textContent = `${data.total_bits.toFixed(1)} bits in ` +
      `all, ${data.bits_per_byte.toFixed(3)} bits per byte; darker = more surprising`;
    const div = document.createElement("div");
    data.tokens.forEach((tok, i) => {
      const s = document.createElement("span");
      const bits = data.bits[i];
      s.className = "tok";
      s.textContent = tok;
      s.style.background = bits === null ? "#eee" : colour(bits / top, 0);
      s.onmouseover = () => show(bits === null ? `${labels[i]}: the first token, not predicted` :
        `${labels[i]} (id ${data.ids[i]}): ${bits.toFixed(3)} bits = ` +
        `${data.nats[i].toFixed(3)} nats`);
      div.appendChild(s);
      if (tok.endsWith("\u21b5")) div.appendChild(document.createElement("br"));
    });
    view.replaceChildren(div);
  },
  lens() {
    const L = data.top_probs.length, row = (i) => L - 1 - i; // the last layer on top
    const names = data.top_probs.map((_, l) => layerName(l)).reverse();
    const text = (i, j) => `${names[i]}, at ${labels[j]}: top ${data.top_tokens[row(i)][j]} ` +
      `p = ${data.top_probs[row(i)][j].toFixed(4)}; ` +
      `final prediction ranked #${data.final_rank[row(i)][j]}`;
    view.replaceChildren(matrix(data.top_probs.slice().reverse(), text, 260, labels, names));
  },
  norms() {
    const L = data.residual.length, row = (i) => L - 1 - i;
    const names = data.residual.map((_, l) => layerName(l)).reverse();
    const top = Math.max(...data.residual.flat());
    const text = (i, j) => {
      const l = row(i), wrote = l === 0 ? "" : `; attn added ${data.attn[l - 1][j].toFixed(3)}` +
        `, mlp added ${data.mlp[l - 1][j].toFixed(3)}`;
      return `${names[i]}, ${labels[j]}: |residual| = ${data.residual[l][j].toFixed(3)}${wrote}`;
    };
    const scaled = data.residual.map((r) => r.map((v) => v / top)).reverse();
    view.replaceChildren(matrix(scaled, text, 30, labels, names));
  },
};
renderers[data.view]();
