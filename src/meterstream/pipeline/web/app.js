// meterstream live dashboard: plain JS, no libraries, no network beyond this worker's API.
// Every figure is rendered from one JSON document (its URL is the view's data-src) as
// <span data-k="path.in.doc" data-f="format">, so a test can hold the page to the API.
"use strict";

const I18N = {
  zh: {
    "nav.overview": "总览", "nav.areas": "台区", "nav.commands": "命令队列", "nav.find": "终端或表号",
    "nav.go": "查询", "live.on": "实时", "live.off": "断开", "auth.token": "操作员令牌",
    "auth.signin": "登录", "auth.signout": "退出", "auth.viewer": "只读用户：登录后才能下发命令",
    "auth.bad": "令牌无效", "auth.as": "操作员",
    "ov.title": "运行总览", "meters": "电表", "terminals": "终端", "terminals_online": "在线终端",
    "terminals_held": "本节点终端", "customers": "用户", "in_arrears": "欠费用户", "cut_off": "已停电",
    "awaiting_reconnection": "待复电", "open_alarms": "未关闭告警", "escalations": "升级工单",
    "success_class": "今日采集成功率（按类别）", "dedicated": "专变", "public": "公变", "lowvoltage": "低压",
    "success_area": "今日采集成功率（按台区）", "reconn": "复电及时率", "target": "目标（秒）",
    "timely": "及时率", "confirmed": "已确认", "within_target": "目标内", "failed": "失败",
    "latency": "复电时延分布", "alarms": "告警", "readings": "读数", "payments": "缴费",
    "commands_sent": "已发命令", "kind": "类型", "since": "开始", "area": "台区", "terminal": "终端",
    "areas.title": "台区", "online_rate": "在线率", "success_rate": "成功率", "line_loss": "线损率",
    "dropout_alarm": "批量掉线告警", "online": "在线", "yes": "是", "no": "否",
    "chart.online": "在线终端（最近数小时）", "chart.reads": "每个间隔的读数", "ring": "快照环",
    "term.title": "终端", "meter": "电表", "last_reading": "最后读数时间", "registers": "总电量 (0.01 kWh)",
    "relay": "继电器（费控判定）", "relay_read": "继电器（最近读回）", "keep_power": "保电", "balance": "余额（元）", "fail_streak": "连续失败", "missed_cycles": "漏采周期",
    "last_seen": "最后联系", "class": "类别",
    "meter.title": "用户（电表）", "paid": "已缴（元）", "charged": "已扣（元）",
    "bal_hist": "余额历史", "ts": "时间", "why": "原因", "pay_hist": "缴费记录", "amount": "金额（元）",
    "channel": "渠道", "ledger": "缴费台账", "state": "状态", "cmds": "命令及状态变迁",
    "action": "动作", "who": "操作人", "cause": "原因", "attempts": "尝试次数", "send": "下发",
    "reason": "原因（写入审计）", "act.close": "复电", "act.trip": "停电", "act.keep-power-on": "保电",
    "act.keep-power-off": "解除保电", "sent_ok": "已受理", "q.title": "命令队列",
    "by_state": "按状态与时长", "count": "数量", "oldest": "最久（秒）", "open": "未完成命令",
    "age": "时长（秒）", "id": "编号", "none": "无", "notfound": "未找到",
  },
  en: {
    "nav.overview": "Overview", "nav.areas": "Areas", "nav.commands": "Commands", "nav.find": "terminal or meter",
    "nav.go": "Go", "live.on": "live", "live.off": "disconnected", "auth.token": "operator token",
    "auth.signin": "Sign in", "auth.signout": "Sign out", "auth.viewer": "Viewer: sign in as an operator to send commands",
    "auth.bad": "not an operator token", "auth.as": "operator",
    "ov.title": "Overview", "meters": "Meters", "terminals": "Terminals", "terminals_online": "Terminals online",
    "terminals_held": "Terminals held here", "customers": "Customers", "in_arrears": "In arrears", "cut_off": "Cut off",
    "awaiting_reconnection": "Awaiting reconnection", "open_alarms": "Open alarms", "escalations": "Escalations",
    "success_class": "Collection success today, per class", "dedicated": "Dedicated", "public": "Public", "lowvoltage": "Low voltage",
    "success_area": "Collection success today, per area", "reconn": "Reconnection timeliness", "target": "Target (s)",
    "timely": "Timely", "confirmed": "Confirmed", "within_target": "Within target", "failed": "Failed",
    "latency": "Reconnection latency", "alarms": "Alarms", "readings": "Readings", "payments": "Payments",
    "commands_sent": "Commands sent", "kind": "Kind", "since": "Since", "area": "Area", "terminal": "Terminal",
    "areas.title": "Areas", "online_rate": "Online rate", "success_rate": "Success rate", "line_loss": "Line loss",
    "dropout_alarm": "Mass dropout", "online": "Online", "yes": "yes", "no": "no",
    "chart.online": "Online terminals (last hours)", "chart.reads": "Readings per interval", "ring": "snapshot ring",
    "term.title": "Terminal", "meter": "Meter", "last_reading": "Last reading", "registers": "Total (0.01 kWh)",
    "relay": "Relay (billing decision)", "relay_read": "Relay (last read back)", "keep_power": "Keep power", "balance": "Balance (yuan)", "fail_streak": "Failed reads", "missed_cycles": "Missed cycles",
    "last_seen": "Last seen", "class": "Class",
    "meter.title": "Customer (meter)", "paid": "Paid (yuan)", "charged": "Charged (yuan)",
    "bal_hist": "Balance history", "ts": "Time", "why": "Why", "pay_hist": "Payments", "amount": "Amount (yuan)",
    "channel": "Channel", "ledger": "Payment ledger", "state": "State", "cmds": "Commands and their transitions",
    "action": "Action", "who": "Who", "cause": "Cause", "attempts": "Attempts", "send": "Send",
    "reason": "reason (goes into the audit trail)", "act.close": "Reconnect", "act.trip": "Cut off",
    "act.keep-power-on": "Keep power on", "act.keep-power-off": "Keep power off", "sent_ok": "accepted",
    "q.title": "Command queue", "by_state": "By state and age", "count": "Count", "oldest": "Oldest (s)",
    "open": "Open commands", "age": "Age (s)", "id": "Id", "none": "none", "notfound": "not found",
  },
};

let lang = localStorage.getItem("ms.lang") || "zh";
let token = sessionStorage.getItem("ms.token") || "";
let operator = null;
let lastOverview = null;
let refetchBusy = false;

const t = (k) => (I18N[lang][k] !== undefined ? I18N[lang][k] : k);
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

// --- formats (docs/dashboard.md "Formats"; the test formats the JSON the same way) ---------
function fmtBp(v) {
  if (v === null || v === undefined) return "—";
  const a = Math.abs(v);
  return (v < 0 ? "-" : "") + Math.floor(a / 100) + "." + String(a % 100).padStart(2, "0") + "%";
}
function fmtYuan(s) { // "-12.345678" (exact micro-yuan string) -> "-12.35", half away from zero
  if (s === null || s === undefined) return "—";
  const neg = s.startsWith("-");
  const [i, f = ""] = (neg ? s.slice(1) : s).split(".");
  const micro = BigInt(i) * 1000000n + BigInt((f + "000000").slice(0, 6));
  const cents = (micro + 5000n) / 10000n;
  const out = (cents / 100n).toString() + "." + (cents % 100n).toString().padStart(2, "0");
  return (neg && cents !== 0n ? "-" : "") + out;
}
function fmt(v, f) {
  if (f === "bp") return fmtBp(v);
  if (f === "yuan") return fmtYuan(v);
  if (v === null || v === undefined) return "—";
  if (f === "bool") return v ? t("yes") : t("no");
  return String(v);
}
function get(doc, path) { return path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), doc); }
function fig(doc, path, f = "int", cls = "") {
  return `<span data-k="${path}" data-f="${f}"${cls ? ` class="${cls}"` : ""}>${esc(fmt(get(doc, path), f))}</span>`;
}
function card(doc, label, path, f = "int") {
  const small = f === "text" && String(get(doc, path) || "").length > 12 ? " small" : "";
  return `<div class="card"><div class="label">${esc(t(label))}</div><div class="value${small}">${fig(doc, path, f)}</div></div>`;
}

async function api(url, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(url, Object.assign({}, opts, { headers }));
  const body = await r.json().catch(() => ({}));
  return { ok: r.ok, status: r.status, body };
}
function setView(html, src) {
  const v = $("#view");
  v.innerHTML = html;
  v.dataset.src = src;
}

// --- SVG charts ------------------------------------------------------------------------------
function lineChart(points, label, w = 560, h = 150) {
  const pad = 30;
  if (points.length < 2) return `<svg width="${w}" height="${h}" role="img" aria-label="${esc(label)}"><text x="10" y="20">${esc(label)}: —</text></svg>`;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(y0 + 1, ...ys);
  const X = (x) => pad + ((x - x0) / Math.max(1, x1 - x0)) * (w - 2 * pad);
  const Y = (y) => h - pad + 10 - ((y - y0) / (y1 - y0)) * (h - 2 * pad);
  const d = points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
  const tm = (ms) => new Date(ms).toISOString().slice(11, 19);
  return `<svg width="${w}" height="${h}" role="img" aria-label="${esc(label)}">
    <text x="8" y="14" font-size="12">${esc(label)}</text>
    <text x="2" y="${Y(y1) + 4}" font-size="10">${y1}</text><text x="2" y="${Y(y0)}" font-size="10">${y0}</text>
    <line x1="${pad}" y1="${Y(0)}" x2="${w - pad}" y2="${Y(0)}" stroke="#aab"/>
    <path d="${d}" fill="none" stroke="#1f6feb" stroke-width="2"/>
    <text x="${pad}" y="${h - 4}" font-size="10">${tm(x0)}</text><text x="${w - pad - 50}" y="${h - 4}" font-size="10">${tm(x1)}</text></svg>`;
}
function barChart(labels, values, title, w = 560, h = 150) {
  const pad = 24, n = values.length, y1 = Math.max(1, ...values), bw = (w - 2 * pad) / n;
  const bars = values.map((v, i) => {
    const bh = (v / y1) * (h - 2 * pad - 10);
    return `<rect x="${pad + i * bw + 2}" y="${h - pad - bh}" width="${bw - 4}" height="${bh}" fill="#2e9d5b"/>
      <text x="${pad + i * bw + 2}" y="${h - pad - bh - 2}" font-size="10">${v}</text>
      <text x="${pad + i * bw + 2}" y="${h - 8}" font-size="9">${esc(labels[i])}</text>`;
  }).join("");
  return `<svg width="${w}" height="${h}" role="img" aria-label="${esc(title)}"><text x="8" y="14" font-size="12">${esc(title)}</text>${bars}</svg>`;
}

// --- pages -----------------------------------------------------------------------------------
function renderOverview(doc) {
  const cls = ["dedicated", "public", "lowvoltage"];
  const r = doc.reconnection;
  const bl = r.bounds_s.map((b) => "≤" + b + "s").concat([">" + r.bounds_s[r.bounds_s.length - 1] + "s"]);
  const alarms = doc.alarms.map((a, i) => `<tr><td>${fig(doc, `alarms.${i}.kind`, "text")}</td>
    <td>${fig(doc, `alarms.${i}.${a.area !== undefined && a.kind === "area_dropout" ? "area" : "terminal"}`, "text")}</td>
    <td>${fig(doc, `alarms.${i}.since`, "text")}</td></tr>`).join("");
  setView(`<h2>${esc(t("ov.title"))} <span class="muted" data-k="ts" data-f="text">${esc(doc.ts)}</span></h2>
    <div class="cards">
      ${card(doc, "meters", "meters")}${card(doc, "terminals", "terminals")}
      ${card(doc, "terminals_online", "terminals_online")}${card(doc, "terminals_held", "terminals_held")}
      ${card(doc, "customers", "customers")}${card(doc, "in_arrears", "in_arrears")}
      ${card(doc, "cut_off", "cut_off")}${card(doc, "awaiting_reconnection", "awaiting_reconnection")}
      ${card(doc, "open_alarms", "open_alarms")}${card(doc, "escalations", "escalations")}
      ${card(doc, "readings", "counters.readings")}${card(doc, "payments", "counters.payments")}
      ${card(doc, "commands_sent", "counters.commands_sent")}
    </div>
    <h3>${esc(t("success_class"))}</h3>
    <div class="cards">${cls.map((c) => card(doc, c, `success_bp_by_class.${c}`, "bp")).join("")}</div>
    <h3>${esc(t("success_area"))}</h3>
    <table><tr><th>${esc(t("area"))}</th><th class="num">${esc(t("success_rate"))}</th></tr>
    ${doc.areas.map((a, i) => `<tr><td>${fig(doc, `areas.${i}.area`, "text")}</td><td class="num">${fig(doc, `areas.${i}.success_bp`, "bp")}</td></tr>`).join("")}</table>
    <h3>${esc(t("reconn"))}</h3>
    <div class="cards">${card(doc, "timely", "reconnection.timely_bp", "bp")}${card(doc, "target", "reconnection.target_s")}
      ${card(doc, "confirmed", "reconnection.confirmed")}${card(doc, "within_target", "reconnection.within_target")}
      ${card(doc, "failed", "reconnection.failed")}</div>
    <p>${barChart(bl, r.counts, t("latency"))}</p>
    <h3>${esc(t("alarms"))}</h3>
    ${doc.alarms.length ? `<table><tr><th>${esc(t("kind"))}</th><th>${esc(t("area"))}/${esc(t("terminal"))}</th><th>${esc(t("since"))}</th></tr>${alarms}</table>` : `<p class="muted">${esc(t("none"))}</p>`}`,
  `/api/overview?seq=${doc.seq}`);
}

function renderAreas(doc) {
  const rows = doc.areas.map((a, i) => `<tr class="${a.dropout_alarm ? "alarm" : ""}">
    <td>${fig(doc, `areas.${i}.area`, "text")}</td><td class="num">${fig(doc, `areas.${i}.terminals`)}</td>
    <td class="num">${fig(doc, `areas.${i}.online`)}</td><td class="num">${fig(doc, `areas.${i}.online_bp`, "bp")}</td>
    <td class="num">${fig(doc, `areas.${i}.success_bp`, "bp")}</td><td class="num">${fig(doc, `areas.${i}.line_loss_bp`, "bp")}</td>
    <td class="num">${fig(doc, `areas.${i}.in_arrears`)}</td><td class="num">${fig(doc, `areas.${i}.cut_off`)}</td>
    <td>${fig(doc, `areas.${i}.dropout_alarm`, "bool", a.dropout_alarm ? "bad" : "ok")}</td></tr>`).join("");
  const s = doc.series;
  const online = s.map((p) => [Date.parse(p.ts), p.online]);
  const reads = s.slice(1).map((p, i) => [Date.parse(p.ts), p.readings - s[i].readings]);
  setView(`<h2>${esc(t("areas.title"))} <span class="muted" data-k="ts" data-f="text">${esc(doc.ts)}</span></h2>
    <table><tr><th>${esc(t("area"))}</th><th class="num">${esc(t("terminals"))}</th><th class="num">${esc(t("online"))}</th>
    <th class="num">${esc(t("online_rate"))}</th><th class="num">${esc(t("success_rate"))}</th><th class="num">${esc(t("line_loss"))}</th>
    <th class="num">${esc(t("in_arrears"))}</th><th class="num">${esc(t("cut_off"))}</th><th>${esc(t("dropout_alarm"))}</th></tr>${rows}</table>
    <p>${lineChart(online, t("chart.online"))}</p><p>${lineChart(reads, t("chart.reads"))}</p>
    <p class="muted">${esc(t("ring"))}: <span data-k="series.length" data-f="int">${s.length}</span> / ${fig(doc, "ring_size")}</p>`,
  `/api/areas?seq=${doc.seq}`);
}

function renderTerminal(doc) {
  const rows = doc.meters.map((m, i) => `<tr><td><a href="#/meter/${esc(m.meter)}">${fig(doc, `meters.${i}.meter`, "text")}</a></td>
    <td>${fig(doc, `meters.${i}.class`, "text")}</td><td>${fig(doc, `meters.${i}.last_reading`, "text")}</td>
    <td class="num">${fig(doc, `meters.${i}.registers_centikwh.0`)}</td><td>${fig(doc, `meters.${i}.relay`, "text")}</td>
    <td class="num">${fig(doc, `meters.${i}.balance`, "yuan")}</td><td class="num">${fig(doc, `meters.${i}.fail_streak`)}</td></tr>`).join("");
  setView(`<h2>${esc(t("term.title"))} ${fig(doc, "terminal", "text")} · ${fig(doc, "area", "text")}</h2>
    <div class="cards">${card(doc, "online", "online", "bool")}${card(doc, "missed_cycles", "missed_cycles")}
    ${card(doc, "last_seen", "last_seen", "text")}</div>
    <table><tr><th>${esc(t("meter"))}</th><th>${esc(t("class"))}</th><th>${esc(t("last_reading"))}</th><th class="num">${esc(t("registers"))}</th>
    <th>${esc(t("relay"))}</th><th class="num">${esc(t("balance"))}</th><th class="num">${esc(t("fail_streak"))}</th></tr>${rows}</table>`,
  `/api/terminals/${encodeURIComponent(doc.terminal)}`);
}

function renderMeter(doc) {
  const v = doc.view;
  const bal = doc.balance_history.map((b, i) => `<tr><td>${fig(doc, `balance_history.${i}.ts`, "text")}</td>
    <td class="num">${fig(doc, `balance_history.${i}.balance`, "yuan")}</td><td>${fig(doc, `balance_history.${i}.why`, "text")}</td></tr>`).join("");
  const pts = doc.balance_history.filter((b) => b.ts).map((b) => [Date.parse(b.ts), Number(fmtYuan(b.balance))]);
  const pays = doc.payments.map((p, i) => `<tr><td>${fig(doc, `payments.${i}.ts`, "text")}</td><td>${fig(doc, `payments.${i}.kind`, "text")}</td>
    <td>${fig(doc, `payments.${i}.payment_id`, "text")}</td><td>${fig(doc, `payments.${i}.channel`, "text")}</td>
    <td class="num">${fig(doc, `payments.${i}.amount`, "yuan")}</td></tr>`).join("");
  const ledger = doc.ledger.map((p, i) => `<tr><td>${fig(doc, `ledger.${i}.payment_id`, "text")}</td><td>${fig(doc, `ledger.${i}.state`, "text")}</td></tr>`).join("");
  const cmds = doc.commands.map((c, i) => `<tr data-command="${esc(c.id)}"><td>${fig(doc, `commands.${i}.id`, "text")}</td><td>${fig(doc, `commands.${i}.action`, "text")}</td>
    <td class="state">${fig(doc, `commands.${i}.state`, "text")}</td><td>${fig(doc, `commands.${i}.who`, "text")}</td><td>${fig(doc, `commands.${i}.cause`, "text")}</td>
    <td><ol class="trans">${c.transitions.map((tr, j) => `<li>${fig(doc, `commands.${i}.transitions.${j}.ts`, "text")}: ${fig(doc, `commands.${i}.transitions.${j}.from_state`, "text")} → ${fig(doc, `commands.${i}.transitions.${j}.to_state`, "text")} (${fig(doc, `commands.${i}.transitions.${j}.who`, "text")})</li>`).join("")}</ol></td></tr>`).join("");
  const acts = ["close", "trip", "keep-power-on", "keep-power-off"];
  const keep = $("#c-action") ? [$("#c-action").value, $("#c-reason").value] : null;
  const dis = operator ? "" : " disabled";
  setView(`<h2>${esc(t("meter.title"))} ${fig(doc, "meter", "text")} · <a href="#/terminal/${esc(v.terminal)}">${fig(doc, "view.terminal", "text")}</a></h2>
    <div class="cards">${card(doc, "balance", "view.balance", "yuan")}${card(doc, "paid", "view.paid", "yuan")}${card(doc, "charged", "view.charged", "yuan")}
    ${card(doc, "relay", "view.relay", "text")}${card(doc, "relay_read", "relay_read.relay", "text")}
    ${card(doc, "keep_power", "relay_read.keep_power", "bool")}${card(doc, "last_reading", "view.last_reading", "text")}${card(doc, "fail_streak", "view.fail_streak")}</div>
    <form class="control" id="control"><select id="c-action"${dis}>${acts.map((a) => `<option value="${a}">${esc(t("act." + a))}</option>`).join("")}</select>
      <input type="text" id="c-reason" placeholder="${esc(t("reason"))}"${dis}> <button id="c-send"${dis}>${esc(t("send"))}</button>
      <span class="msg" id="c-msg">${operator ? "" : esc(t("auth.viewer"))}</span></form>
    <h3>${esc(t("cmds"))}</h3>
    <table><tr><th>${esc(t("id"))}</th><th>${esc(t("action"))}</th><th>${esc(t("state"))}</th><th>${esc(t("who"))}</th><th>${esc(t("cause"))}</th><th></th></tr>${cmds}</table>
    <h3>${esc(t("bal_hist"))}</h3><p>${lineChart(pts, t("bal_hist"))}</p>
    <table><tr><th>${esc(t("ts"))}</th><th class="num">${esc(t("balance"))}</th><th>${esc(t("why"))}</th></tr>${bal}</table>
    <h3>${esc(t("pay_hist"))}</h3>
    <table><tr><th>${esc(t("ts"))}</th><th>${esc(t("kind"))}</th><th>${esc(t("id"))}</th><th>${esc(t("channel"))}</th><th class="num">${esc(t("amount"))}</th></tr>${pays}</table>
    <h3>${esc(t("ledger"))}</h3><table><tr><th>${esc(t("id"))}</th><th>${esc(t("state"))}</th></tr>${ledger}</table>`,
  `/api/meters/${encodeURIComponent(doc.meter)}/history`);
  if (keep) { $("#c-action").value = keep[0]; $("#c-reason").value = keep[1]; }
  $("#control").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await api("/api/commands", { method: "POST", body: JSON.stringify({ meter: doc.meter, action: $("#c-action").value, reason: $("#c-reason").value }) });
    $("#c-msg").textContent = r.ok ? t("sent_ok") : (r.body.error || String(r.status));
    $("#c-msg").className = "msg " + (r.ok ? "ok" : "bad");
  });
}

function renderQueue(doc) {
  const states = Object.keys(doc.by_state).sort();
  const bl = doc.age_buckets_s.map((b) => "≤" + b).concat([">" + doc.age_buckets_s[doc.age_buckets_s.length - 1]]);
  const row = (key, i) => `<tr data-command="${esc(get(doc, key + "." + i + ".id"))}"><td>${fig(doc, `${key}.${i}.id`, "text")}</td>
    <td><a href="#/meter/${esc(get(doc, key + "." + i + ".meter"))}">${fig(doc, `${key}.${i}.meter`, "text")}</a></td>
    <td>${fig(doc, `${key}.${i}.action`, "text")}</td><td>${fig(doc, `${key}.${i}.state`, "text")}</td>
    <td class="num">${fig(doc, `${key}.${i}.age_s`)}</td><td class="num">${fig(doc, `${key}.${i}.attempts`)}</td>
    <td>${fig(doc, `${key}.${i}.who`, "text")}</td><td>${fig(doc, `${key}.${i}.cause`, "text")}</td></tr>`;
  const head = `<tr><th>${esc(t("id"))}</th><th>${esc(t("meter"))}</th><th>${esc(t("action"))}</th><th>${esc(t("state"))}</th>
    <th class="num">${esc(t("age"))}</th><th class="num">${esc(t("attempts"))}</th><th>${esc(t("who"))}</th><th>${esc(t("cause"))}</th></tr>`;
  setView(`<h2>${esc(t("q.title"))}</h2>
    <h3>${esc(t("escalations"))}</h3>
    ${doc.escalations.length ? `<table class="esc">${head}${doc.escalations.map((_, i) => row("escalations", i)).join("")}</table>` : `<p class="muted">${esc(t("none"))}</p>`}
    <h3>${esc(t("by_state"))}</h3>
    <table><tr><th>${esc(t("state"))}</th><th class="num">${esc(t("count"))}</th><th class="num">${esc(t("oldest"))}</th>${bl.map((b) => `<th class="num">${esc(b)}s</th>`).join("")}</tr>
    ${states.map((s) => `<tr><td>${esc(s)}</td><td class="num">${fig(doc, `by_state.${s}.count`)}</td><td class="num">${fig(doc, `by_state.${s}.oldest_s`)}</td>
      ${bl.map((_, j) => `<td class="num">${fig(doc, `by_state.${s}.ages.${j}`)}</td>`).join("")}</tr>`).join("")}</table>
    <h3>${esc(t("open"))} (${fig(doc, "open_total")})</h3>
    <table>${head}${doc.open.map((_, i) => row("open", i)).join("")}</table>`, "/api/queue");
}

// --- routing and refresh -------------------------------------------------------------------------
function route() {
  const h = location.hash.replace(/^#\/?/, "") || "overview";
  const [page, ...rest] = h.split("/");
  return { page, arg: decodeURIComponent(rest.join("/")) };
}
async function show() {
  const { page, arg } = route();
  let r;
  if (page === "overview") {
    r = lastOverview ? { ok: true, body: lastOverview } : await api("/api/overview");
    if (r.ok) renderOverview(r.body);
  } else if (page === "areas") {
    r = await api("/api/areas" + (lastOverview ? "?seq=" + lastOverview.seq : ""));
    if (!r.ok) r = await api("/api/areas");
    if (r.ok) renderAreas(r.body);
  } else if (page === "terminal") {
    r = await api("/api/terminals/" + encodeURIComponent(arg));
    if (r.ok) renderTerminal(r.body);
  } else if (page === "meter") {
    if (document.activeElement && document.activeElement.id === "c-reason") return; // typing
    r = await api("/api/meters/" + encodeURIComponent(arg) + "/history");
    if (r.ok) renderMeter(r.body);
  } else if (page === "commands") {
    r = await api("/api/queue");
    if (r.ok) renderQueue(r.body);
  } else {
    location.hash = "#/overview";
    return;
  }
  if (r && !r.ok) setView(`<h2>${esc(t("notfound"))}</h2><p>${esc(r.body.error || r.status)}</p>`, "");
}
async function refresh() {
  if (refetchBusy) return;
  refetchBusy = true;
  try { await show(); } finally { refetchBusy = false; }
}

function connect() {
  const es = new EventSource("/api/stream");
  const live = $("#live");
  es.addEventListener("open", () => { live.className = "live on"; live.dataset.i18n = "live.on"; live.textContent = t("live.on"); });
  es.addEventListener("error", () => { live.className = "live off"; live.dataset.i18n = "live.off"; live.textContent = t("live.off"); });
  es.addEventListener("overview", (ev) => {
    lastOverview = JSON.parse(ev.data);
    live.dataset.seq = lastOverview.seq;
    if (route().page === "overview") renderOverview(lastOverview);
    else refresh();
  });
}

function labels() {
  document.documentElement.lang = lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-ph]").forEach((el) => { el.placeholder = t(el.dataset.i18nPh); });
  $("#lang").textContent = lang === "zh" ? "English" : "中文";
  if (operator) $("#who").textContent = t("auth.as") + ": " + operator;
}
async function signin() {
  const who = $("#who");
  if (!token) { operator = null; who.textContent = ""; $("#signin").hidden = false; $("#signout").hidden = true; return; }
  const r = await api("/api/whoami");
  if (r.ok && r.body.operator) {
    operator = r.body.operator;
    who.textContent = t("auth.as") + ": " + operator;
    who.dataset.operator = operator;
    $("#signin").hidden = true; $("#signout").hidden = false;
  } else {
    token = ""; sessionStorage.removeItem("ms.token"); operator = null;
    who.textContent = t("auth.bad");
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  labels();
  $("#lang").addEventListener("click", () => { lang = lang === "zh" ? "en" : "zh"; localStorage.setItem("ms.lang", lang); labels(); refresh(); });
  $("#signin").addEventListener("submit", async (ev) => {
    ev.preventDefault(); token = $("#token").value.trim(); sessionStorage.setItem("ms.token", token);
    $("#token").value = ""; await signin(); refresh();
  });
  $("#signout").addEventListener("click", async () => { token = ""; sessionStorage.removeItem("ms.token"); await signin(); refresh(); });
  $("#find").addEventListener("submit", (ev) => {
    ev.preventDefault(); const q = $("#find-q").value.trim();
    if (q) location.hash = /^\d{12}$/.test(q) ? "#/meter/" + q : "#/terminal/" + q;
  });
  window.addEventListener("hashchange", refresh);
  await signin();
  await refresh();
  connect();
});
