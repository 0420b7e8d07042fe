// Help text of the commands: a usage line, what the command does, and the flags in aligned columns
// with their value type, environment variable and default said once.
import type { FlagSpec } from '@cfrsam/rpc';

const METAVAR: Record<string, string> = { string: 'TEXT', int: 'N', number: 'X', boolean: '' };

function kebab(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
}

/** The flags of `spec`, one per line: "  --name VALUE   help (env VAR; default D)". */
export function formatFlags(spec: Record<string, FlagSpec>, metavars: Record<string, string> = {}): string {
  const rows = Object.entries(spec).map(([key, s]) => {
    const meta = metavars[key] ?? METAVAR[s.type] ?? '';
    const left = `--${kebab(key)}${meta ? ` ${meta}` : ''}`;
    const notes: string[] = [];
    if (s.env) notes.push(`env ${s.env}`);
    const shown = s.default !== undefined && s.default !== '' && s.default !== false;
    if (shown) notes.push(`default ${String(s.default)}`);
    return { left, right: `${s.help}${notes.length ? ` (${notes.join('; ')})` : ''}` };
  });
  const width = Math.min(28, Math.max(...rows.map((r) => r.left.length)) + 2);
  return rows
    .map((r) => (r.left.length + 2 > width ? `  ${r.left}\n  ${' '.repeat(width)}${r.right}` : `  ${r.left.padEnd(width)}${r.right}`))
    .join('\n');
}

/** A command's help: usage, description paragraphs, then flag groups ("title" -> spec). */
export function formatHelp(
  usageLine: string,
  description: string,
  groups: Record<string, Record<string, FlagSpec>>,
  metavars: Record<string, string> = {},
): string {
  const parts = [`usage: ${usageLine}`, '', description.trim(), ''];
  for (const [title, spec] of Object.entries(groups)) parts.push(`${title}:`, formatFlags(spec, metavars), '');
  return parts.join('\n').trimEnd();
}
