// Numbers as residents read them: whole kWh and m³ from 100 on, one decimal below, whole percent.
const LOCALE = { de: "de-DE", en: "en-GB" };

export function decimals(value, unit) {
  if (unit === "%") return 0;
  if (unit === "kWh/m³") return 2;
  return Math.abs(value) >= 100 ? 0 : 1;
}

export function number(value, unit, lang) {
  const d = decimals(value, unit);
  return new Intl.NumberFormat(LOCALE[lang], { minimumFractionDigits: d, maximumFractionDigits: d }).format(value);
}

export function withUnit(value, unit, lang) {
  const n = number(value, unit, lang);
  if (unit === "%") return lang === "de" ? `${n}\u00a0%` : `${n}%`;
  return `${n}\u00a0${unit}`;
}

// <data value="…" data-key="…">formatted</data>: machine-readable value, human-readable text
export function dataElement(key, value, unit, lang) {
  const el = document.createElement("data");
  el.value = String(value);
  el.dataset.key = key;
  el.dataset.unit = unit;
  el.textContent = withUnit(value, unit, lang);
  return el;
}

export function dateTime(ms, timeZone, lang) {
  return new Intl.DateTimeFormat(LOCALE[lang], {
    weekday: "long", day: "numeric", month: "long", year: "numeric", hour: "2-digit", minute: "2-digit", timeZone,
  }).format(new Date(ms));
}
