// Lists the routes of /openapi.json (the schema FastAPI builds from the code), with their
// parameters; a self-contained stand-in for Swagger UI, which would load from a CDN.
"use strict";

(async () => {
  const root = document.getElementById("routes");
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  let spec;
  try {
    spec = await (await fetch("/openapi.json")).json();
  } catch (e) {
    root.textContent = `cannot read /openapi.json: ${e.message}`;
    return;
  }
  const resolve = (schema) => {
    const ref = schema && schema.$ref;
    if (!ref) return schema || {};
    return ref.split("/").slice(1).reduce((o, k) => (o ? o[k] : undefined), spec) || {};
  };
  root.replaceChildren();
  for (const [path, ops] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const section = el("section", undefined, "route");
      section.append(el("h2", `${method.toUpperCase()} ${path}`), el("p", op.summary || op.description || ""));
      const rows = [];
      for (const p of op.parameters || []) {
        rows.push([p.name, p.in, (p.schema && (p.schema.type || (p.schema.anyOf || []).map((s) => s.type).join(" | "))) || "",
          p.required ? "required" : "", p.description || ""]);
      }
      const content = (op.requestBody && op.requestBody.content) || {};
      for (const [mime, media] of Object.entries(content)) {
        const schema = resolve(media.schema);
        for (const [name, prop] of Object.entries(schema.properties || {})) {
          const type = prop.type || (prop.anyOf || []).map((s) => s.format || s.type).join(" | ");
          rows.push([name, mime, type, (schema.required || []).includes(name) ? "required" : "", prop.description || ""]);
        }
      }
      if (rows.length) {
        const table = el("table");
        const head = el("tr");
        for (const h of ["name", "in", "type", "", "description"]) head.append(el("th", h));
        table.append(head);
        for (const r of rows) {
          const tr = el("tr");
          for (const c of r) tr.append(el("td", String(c)));
          table.append(tr);
        }
        section.append(table);
      }
      root.append(section);
    }
  }
})();
