-- wrk script: every request renames the user in the URL (PUT /users/{id}), so each one invalidates its tag.
counter = 0
request = function()
  counter = counter + 1
  local body = '{"name":"renamed-' .. counter .. '","email":"renamed-' .. counter .. '@example.com"}'
  return wrk.format("PUT", nil, {["Content-Type"] = "application/json"}, body)
end
