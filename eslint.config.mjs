// ESLint (flat config): the recommended JavaScript and typescript-eslint rules over the TypeScript
// sources and tests, tuned where the codebase's conventions are deliberate. Formatting is
// Prettier's job (.prettierrc.json), not ESLint's. CI runs `npm run lint`.
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['**/dist/**', '**/node_modules/**', 'packages/rpc/src/gen/**', 'runs/**', 'out/**', 'models/**'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    files: ['**/*.ts', '**/*.mjs'],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: 'module',
      globals: {
        process: 'readonly',
        console: 'readonly',
        Buffer: 'readonly',
        __dirname: 'readonly',
        require: 'readonly',
        setTimeout: 'readonly',
        clearTimeout: 'readonly',
        setInterval: 'readonly',
        clearInterval: 'readonly',
        performance: 'readonly',
        URL: 'readonly',
        AbortController: 'readonly',
        AbortSignal: 'readonly',
        TextDecoder: 'readonly',
        TextEncoder: 'readonly',
        structuredClone: 'readonly',
        queueMicrotask: 'readonly',
        setImmediate: 'readonly',
        SharedArrayBuffer: 'readonly',
        fetch: 'readonly',
      },
    },
    rules: {
      // `_name` marks a deliberately unused binding (destructuring to drop a field, callbacks).
      '@typescript-eslint/no-unused-vars': [
        'error',
        { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none', ignoreRestSiblings: true },
      ],
      // Worker threads and grpc-js dynamic clients are loaded with require() on purpose.
      '@typescript-eslint/no-require-imports': 'off',
      // `expr && sideEffect()` and comma expressions appear in small, readable places.
      '@typescript-eslint/no-unused-expressions': 'off',
    },
  },
  {
    // Tests poke at loosely typed library objects (grpc-js internals, parsed YAML).
    files: ['**/test/**/*.ts', 'test/**/*.ts'],
    rules: { '@typescript-eslint/no-explicit-any': 'off' },
  },
);
