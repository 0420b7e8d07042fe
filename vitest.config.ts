import { defineConfig } from 'vitest/config';

// Unit tests live beside each package (packages/*/test, services/*/test); integration tests in
// test/ start the services as separate processes over loopback gRPC, so they need `npm run build`
// first and get longer timeouts.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['packages/*/test/**/*.test.ts', 'services/*/test/**/*.test.ts'],
          testTimeout: 60_000,
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/**/*.test.ts'],
          testTimeout: 300_000,
          hookTimeout: 300_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
